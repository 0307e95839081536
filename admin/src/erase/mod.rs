//! `pulse-admin users erase`: the right to be forgotten (see `pulse_core::erasure`).
//!
//! For each person asked for (and every device merged into them), in this order:
//!
//! 1. **suppressed**: their ids go to the compacted erasures topic. Ingest, the speed layer,
//!    the archiver, the notifier and a recompute follow it and pass over the person's records
//!    from then on; the command then waits `--settle-secs` for them to have seen it.
//! 2. **profiles**: their documents (and pointers to them) are deleted from every profiles
//!    index of the alias: the live one, those kept for rollback, a recompute's.
//! 3. **notifier**: a tombstone for their push state.
//! 4. **archive**: every committed file of their partitions that holds their rows is
//!    rewritten without them (`pulse_archive::erase`).
//! 5. **warehouse**: a DML `DELETE` of their rows from each day that held them, and from
//!    `identities`.
//!
//! Each step is idempotent, and the audit log (`audit`) records each as it is done, so a run
//! cut short at any point is finished by running the same command again; one run at a time
//! holds the erasures' lease (two runs rewriting one archive file would each put back the
//! other's rows).

pub mod audit;
mod journal;
pub mod requests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{NaiveDate, Utc};
use object_store::ObjectStore;
use pulse_archive::erase::Rewritten;
use pulse_archive::store::{open_store, StoreArgs};
use pulse_batch::warehouse::erase::Deleted;
use pulse_batch::warehouse::{Warehouse, WarehouseArgs};
use pulse_core::erasure::{Erasure, Erasures, IdKind};
use pulse_core::event::partition_key;
use pulse_core::kafka::{KafkaArgs, TopicArgs};
use pulse_service::consumer::compacted;
use pulse_service::Shutdown;
use pulse_speed::erase::{delete_profiles, profile_indices, resolve, Person};
use pulse_speed::recompute::lease;
use pulse_speed::store::{EsArgs, ProfileStore};
use serde_json::json;

use audit::AuditRecord;
use requests::Request;

#[derive(Debug, Clone, clap::Args)]
pub struct EraseArgs {
    /// The partner whose person is erased.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub partner: Option<String>,
    /// The person's user id.
    #[arg(long, requires = "partner", conflicts_with = "anonymous_id")]
    pub user: Option<String>,
    /// The person's anonymous id (a device merged into a person erases the person).
    #[arg(long = "anonymous-id", requires = "partner")]
    pub anonymous_id: Option<String>,
    /// Many requests: JSON lines `{"partner_id": …, "user_id": …}` (or `"anonymous_id"`).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Print what would be removed, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Who asks, for the audit log (defaults to $USER).
    #[arg(long, env = "PULSE_OPERATOR")]
    pub operator: Option<String>,
    /// The partner's reference of the request (a ticket number), for the audit log. Not the
    /// person's data: the log keeps no ids.
    #[arg(long)]
    pub reference: Option<String>,
    /// Seconds to wait after the suppression is recorded, for every running service to have
    /// seen it (they follow the topic within about a second) before stored data is deleted.
    #[arg(long, env = "PULSE_ERASE_SETTLE_SECS", default_value_t = 10.0)]
    pub settle_secs: f64,
    /// Test hook: the process aborts (no cleanup, as under SIGKILL) once this many archive
    /// files were rewritten, so a test can see that a rerun finishes the erasure.
    #[arg(long, env = "PULSE_FAILPOINT_ERASE_KILL_AFTER_FILES", hide = true)]
    pub failpoint_kill_after_files: Option<u64>,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
    /// The notifier's push state (its `--state-topic`).
    #[arg(
        long = "state-topic",
        env = "PULSE_NOTIFIER_STATE_TOPIC",
        default_value = "triggers.state"
    )]
    pub state_topic: String,
    #[command(flatten)]
    pub es: EsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub warehouse: WarehouseArgs,
}

/// What a run removed (or, with `--dry-run`, would remove), printed as JSON. No ids.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub requests: Vec<RequestReport>,
    /// Profile documents (the person's, their devices', pointers to them) per index.
    pub documents: BTreeMap<String, u64>,
    /// Push-state tombstones written (a dry run writes none).
    pub push_state_tombstones: usize,
    pub archive: Rewritten,
    /// Rows deleted from the warehouse, or why it was not asked.
    pub warehouse: serde_json::Value,
    pub elapsed_secs: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestReport {
    pub request_id: String,
    pub partner_id: String,
    /// Ids erased by kind.
    pub ids: BTreeMap<String, usize>,
    /// Stores done before this run (a rerun), empty for a new request.
    pub done_before: Vec<String>,
}

/// One person resolved, with the request they belong to.
struct Erasing {
    person: Person,
    request_id: String,
    audit: AuditRecord,
}

/// Runs the erasure (see the module documentation).
pub async fn erase(args: &EraseArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let asked = match (&args.file, &args.partner) {
        (Some(path), _) => requests::from_file(path)?,
        (None, Some(partner)) => {
            vec![
                Request::new(partner, args.user.as_deref(), args.anonymous_id.as_deref())
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            ]
        }
        (None, None) => anyhow::bail!(requests::RequestError::Empty),
    };
    let profiles = ProfileStore::new(&args.es)?;
    let archive = open_store(&args.store)?;
    let indices = profile_indices(&profiles)
        .await
        .context("listing the profiles indices")?;
    let known = recorded_erasures(&args.kafka, &args.topics.erasures).await?;
    let asker = Asker {
        operator: args.operator.clone().unwrap_or_else(default_operator),
        reference: args.reference.clone(),
    };
    let mut people = resolve_all(
        &profiles,
        &indices,
        &asked,
        &known,
        archive.as_ref(),
        &asker,
    )
    .await?;
    let mut report = Report {
        dry_run: args.dry_run,
        requests: people
            .iter()
            .map(|e| RequestReport {
                request_id: e.request_id.clone(),
                partner_id: e.person.partner_id.clone(),
                ids: e.audit.ids.clone(),
                done_before: e.audit.steps.keys().cloned().collect(),
            })
            .collect(),
        ..Report::default()
    };
    tracing::info!(
        requests = people.len(),
        indices = indices.len(),
        dry_run = args.dry_run,
        "erasing"
    );

    // One erasure at a time over the alias's indices and the archive.
    let held = match args.dry_run {
        true => None,
        false => Some(take_lease(&profiles).await?),
    };
    let outcome = run_steps(args, &profiles, &indices, archive, &mut people, &mut report).await;
    if let Some(lease) = held {
        let lost = lease.lost();
        lease.release().await;
        anyhow::ensure!(
            !lost,
            "another erasure took the lease over while this one ran; run this one again"
        );
    }
    outcome?;
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn run_steps(
    args: &EraseArgs,
    profiles: &ProfileStore,
    indices: &[String],
    archive: Arc<dyn ObjectStore>,
    people: &mut [Erasing],
    report: &mut Report,
) -> anyhow::Result<()> {
    let dry = args.dry_run;
    let by_partner = ids_by_partner(people);
    // 1. Suppressed: from here on nothing new of them is stored anywhere.
    if !dry {
        let now = Utc::now();
        let records: Vec<Erasure> = people
            .iter()
            .flat_map(|e| {
                e.person.ids.iter().map(|(id, kind)| Erasure {
                    partner_id: e.person.partner_id.clone(),
                    id: id.clone(),
                    kind: *kind,
                    request_id: e.request_id.clone(),
                    requested_at: e.audit.requested_at,
                })
            })
            .collect();
        pulse_service::erasures::record(&args.kafka, &args.topics.erasures, &records)
            .await
            .map_err(|e| anyhow::anyhow!("recording the suppression: {e}"))?;
        for e in people.iter_mut() {
            e.audit.runs.push(now);
            e.audit
                .done("suppressed", json!({"ids": e.person.ids.len()}));
        }
        save_all(archive.as_ref(), people).await?;
        let settle = Duration::from_secs_f64(args.settle_secs.max(0.0));
        eprintln!(
            "suppressed {} ids of {} people; waiting {:.0} s for every service to see it",
            records.len(),
            people.len(),
            settle.as_secs_f64()
        );
        tokio::time::sleep(settle).await;
    }

    // 2. Profiles, in every index of the alias.
    for index in indices {
        let mut n = 0;
        for (partner, ids) in &by_partner {
            let ids: Vec<String> = ids.iter().cloned().collect();
            n += delete_profiles(profiles, index, partner, &ids, dry)
                .await
                .with_context(|| format!("deleting profiles from {index}"))?;
        }
        report.documents.insert(index.clone(), n);
    }
    let documents: u64 = report.documents.values().sum();
    finish_step(
        args,
        archive.as_ref(),
        people,
        "profiles",
        json!({"documents": documents, "indices": indices.len()}),
    )
    .await?;

    // 3. The notifier's push state.
    let users: Vec<String> = by_partner
        .iter()
        .flat_map(|(p, ids)| ids.iter().map(move |id| partition_key(p, id)))
        .collect();
    if !dry {
        report.push_state_tombstones =
            pulse_speed::notifier::ledger::erase_users(&args.kafka, &args.state_topic, &users)
                .await
                .map_err(|e| anyhow::anyhow!("push state: {e}"))?;
    }
    finish_step(
        args,
        archive.as_ref(),
        people,
        "notifier",
        json!({"tombstones": report.push_state_tombstones}),
    )
    .await?;

    // 4. The archive.
    let mut erasures = Erasures::default();
    for (partner, ids) in &by_partner {
        for id in ids {
            erasures.insert(partner, id);
        }
    }
    let partitions = events_partitions(args).await?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message("rewriting the archive");
    let mut journal = journal::Journal {
        people,
        archive: archive.as_ref(),
        dry_run: dry,
        bar: bar.clone(),
        kill_after: args.failpoint_kill_after_files,
    };
    let rewritten =
        pulse_archive::erase::rewrite(&archive, &erasures, partitions, dry, &mut journal)
            .await
            .context("rewriting the archive")?;
    bar.finish_and_clear();
    report.archive = rewritten.clone();
    for e in people.iter_mut() {
        e.audit.days.extend(rewritten.days.iter().copied());
    }
    let detail = json!({
        "files_rewritten": rewritten.files_rewritten,
        "rows_removed": rewritten.rows_removed,
        "batch_requests": people.len(),
    });
    finish_step(args, archive.as_ref(), people, "archive", detail).await?;

    // 5. The warehouse, on every day any request of the batch had rows on.
    let days: BTreeSet<NaiveDate> = people.iter().flat_map(|e| e.audit.days.clone()).collect();
    let deleted = match &args.warehouse.project {
        None => {
            report.warehouse = json!({"skipped": "no --bq-project: no warehouse configured"});
            None
        }
        Some(_) => {
            let wh = Warehouse::connect(&args.warehouse).await?;
            let deleted = pulse_batch::warehouse::erase::erase(&wh, &by_partner, &days, dry)
                .await
                .context("deleting from the warehouse")?;
            report.warehouse = serde_json::to_value(&deleted).unwrap_or_default();
            Some(deleted)
        }
    };
    let detail = match &deleted {
        Some(Deleted { events, identities }) => json!({
            "event_rows": events.values().sum::<u64>(),
            "identity_rows": identities,
            "days": days.len(),
            "batch_requests": people.len(),
        }),
        None => report.warehouse.clone(),
    };
    finish_step(args, archive.as_ref(), people, "warehouse", detail).await?;
    if !dry {
        for e in people.iter_mut() {
            // Deleted everywhere: the days are no longer needed to find anything.
            e.audit.days.clear();
        }
        save_all(archive.as_ref(), people).await?;
    }
    Ok(())
}

/// Marks `step` done in every request's audit record (not in a dry run).
async fn finish_step(
    args: &EraseArgs,
    archive: &dyn ObjectStore,
    people: &mut [Erasing],
    step: &str,
    detail: serde_json::Value,
) -> anyhow::Result<()> {
    if args.dry_run {
        return Ok(());
    }
    for e in people.iter_mut() {
        e.audit.done(step, detail.clone());
    }
    save_all(archive, people).await
}

async fn save_all(archive: &dyn ObjectStore, people: &[Erasing]) -> anyhow::Result<()> {
    for e in people {
        audit::save(archive, &e.audit).await?;
    }
    Ok(())
}

/// Every erased id of each partner.
fn ids_by_partner(people: &[Erasing]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in people {
        out.entry(e.person.partner_id.clone())
            .or_default()
            .extend(e.person.ids.keys().cloned());
    }
    out
}

/// Resolves each request to its person and devices, once per person, with the request id
/// and audit record of an earlier run when there was one: its ids (from the erasures topic)
/// are added, as the profiles that named the devices may be deleted by now.
async fn resolve_all(
    profiles: &ProfileStore,
    indices: &[String],
    asked: &[Request],
    known: &HashMap<String, Erasure>,
    archive: &dyn ObjectStore,
    asker: &Asker,
) -> anyhow::Result<Vec<Erasing>> {
    let mut out: Vec<Erasing> = Vec::new();
    for r in asked {
        let mut person = resolve(profiles, indices, &r.partner_id, &r.id, r.kind)
            .await
            .context("resolving the person")?;
        // A request made before: the same request, with every id it erased.
        let earlier = person
            .ids
            .keys()
            .find_map(|id| known.get(&partition_key(&person.partner_id, id)))
            .map(|e| e.request_id.clone());
        if let Some(request_id) = &earlier {
            for e in known.values().filter(|e| &e.request_id == request_id) {
                if e.partner_id == person.partner_id {
                    person.ids.entry(e.id.clone()).or_insert(e.kind);
                }
            }
        }
        if out
            .iter()
            .any(|e| e.person.partner_id == person.partner_id && e.person.id == person.id)
        {
            continue;
        }
        let request_id = earlier.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let audit = match audit::load(archive, &request_id).await? {
            Some(record) => record,
            None => AuditRecord {
                request_id: request_id.clone(),
                partner_id: person.partner_id.clone(),
                operator: asker.operator.clone(),
                reference: asker.reference.clone(),
                requested_at: Utc::now(),
                ..AuditRecord::default()
            },
        };
        out.push(Erasing {
            person,
            request_id,
            audit,
        });
    }
    for e in &mut out {
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for kind in e.person.ids.values() {
            *kinds.entry(kind_name(*kind).to_string()).or_default() += 1;
        }
        e.audit.ids = kinds;
    }
    Ok(out)
}

fn kind_name(kind: IdKind) -> &'static str {
    match kind {
        IdKind::User => "user",
        IdKind::Anonymous => "anonymous",
        IdKind::Alias => "alias",
    }
}

/// Who asked for a run, as the audit log names them.
struct Asker {
    operator: String,
    reference: Option<String>,
}

/// `--operator` unset (and no `PULSE_OPERATOR`, which clap reads): the login name.
fn default_operator() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
}

/// Every erasure recorded so far, by key.
async fn recorded_erasures(
    kafka: &KafkaArgs,
    topic: &str,
) -> anyhow::Result<HashMap<String, Erasure>> {
    let (kafka, topic) = (kafka.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer = kafka.client_config().create()?;
        let partitions = compacted::partitions_if_any(&consumer, &topic)?;
        let mut out = HashMap::new();
        for p in 0..partitions {
            let config = kafka.consumer_config("pulse-admin-erasures");
            for (key, payload) in
                compacted::read_to_end(config, &topic, p, Duration::from_secs(60))?
            {
                match payload.map(|p| serde_json::from_slice::<Erasure>(&p)) {
                    Some(Ok(e)) => {
                        out.insert(key, e);
                    }
                    None => {
                        out.remove(&key);
                    }
                    Some(Err(_)) => {}
                }
            }
        }
        Ok::<_, rdkafka::error::KafkaError>(out)
    })
    .await?
    .with_context(|| "reading the erasures topic")
}

/// Partitions of the events topic: where each id's records are.
async fn events_partitions(args: &EraseArgs) -> anyhow::Result<i32> {
    let (config, topic) = (args.kafka.client_config(), args.topics.events.clone());
    let stop = Shutdown::new();
    // The partition count is retried while the broker does not answer: not for ever here.
    let deadline = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        deadline.stop();
    });
    let count = tokio::task::spawn_blocking(move || {
        pulse_service::consumer::partition_count(&config, &topic, &stop)
    })
    .await??;
    Ok(count)
}

/// The lease of the alias's erasures (an entry of its leases index).
async fn take_lease(profiles: &ProfileStore) -> anyhow::Result<Box<lease::Lease>> {
    let alias = profiles.alias().to_string();
    let name = format!("{alias}-erasures");
    match lease::acquire(profiles, &alias, &name, "erase").await? {
        lease::Acquired::Held(mut held) => {
            held.keep_renewed(&tokio::runtime::Handle::current(), || {});
            Ok(held)
        }
        lease::Acquired::Busy(holder) => anyhow::bail!(
            "another erasure is running: {} (in {}); wait for it",
            holder.describe(Utc::now().timestamp_millis()),
            lease::lease_index(&alias)
        ),
    }
}
