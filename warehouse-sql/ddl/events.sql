-- The warehouse table of Pulse events, one row per event, partitioned by event date.
-- Columns follow pulse_core::schema::event_schema() (checked by a test in batch-layer).
-- Replace `pulse` with your dataset; {{partition_expiration_days}} with a number or drop the
-- option. The loader creates the table with these columns and partitioning when it is missing
-- (column descriptions are only in this file).
CREATE TABLE IF NOT EXISTS pulse.events (
  message_id   STRING NOT NULL OPTIONS(description = "dedupe key of the event"),
  event        STRING NOT NULL OPTIONS(description = "snake_case event type"),
  partner_id   STRING NOT NULL,
  user_id      STRING,
  anonymous_id STRING,
  timestamp    TIMESTAMP NOT NULL OPTIONS(description = "when it happened (client clock)"),
  received_at  TIMESTAMP NOT NULL OPTIONS(description = "when ingest accepted it"),
  date         DATE NOT NULL OPTIONS(description = "UTC day of timestamp; the partition"),
  session_id   STRING,
  partner_name STRING,
  country      STRING,
  language     STRING,
  version      STRING,
  user_agent   STRING,
  referrer     STRING,
  current_url  STRING,
  page_type    STRING,
  category     ARRAY<STRING>,
  search_query STRING,
  product_id   STRING,
  cart_amount  NUMERIC OPTIONS(description = "exact decimal amount"),
  gender       STRING,
  init_session BOOL,
  properties   STRING OPTIONS(description = "free object, JSON text"),
  context      STRING OPTIONS(description = "free object, JSON text"),
  kafka_partition INT64 OPTIONS(description = "partition of the events topic it was read from (NULL in files archived before positions were kept)"),
  kafka_offset INT64 OPTIONS(description = "offset in that partition: (kafka_partition, kafka_offset) is unique")
)
PARTITION BY date
OPTIONS(
  description = "Pulse clickstream events, loaded daily from the Parquet archive",
  partition_expiration_days = {{partition_expiration_days}}
);
