-- The warehouse table of anonymous devices the speed layer merged into people, and of the
-- merges operators undid: one row per device, kind and day, from the records the archive
-- keeps beside the events.
-- Columns follow pulse_batch::identities::identities_schema() (checked by a test in
-- batch-layer). Replace `pulse` with your dataset. The loader creates it when missing.
CREATE TABLE IF NOT EXISTS pulse.identities (
  partner_id      STRING NOT NULL,
  anonymous_id    STRING NOT NULL OPTIONS(description = "the device"),
  user_id         STRING NOT NULL OPTIONS(description = "the person it was merged into"),
  kind            STRING NOT NULL OPTIONS(description = "merge, or unlink: an operator undid the merge"),
  linked_at       TIMESTAMP NOT NULL OPTIONS(description = "when the linking event happened (merge) or the unlink was made"),
  date            DATE NOT NULL OPTIONS(description = "UTC day the merge was written; the partition"),
  kafka_partition INT64 NOT NULL OPTIONS(description = "position of the merge record in the events topic"),
  kafka_offset    INT64 NOT NULL
)
PARTITION BY date
OPTIONS(
  description = "Anonymous devices merged into people by the speed layer, loaded daily from the Parquet archive"
);
