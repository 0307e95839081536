//! `pulse-speed`: the speed layer (`run`), its Elasticsearch setup (`setup`) and the
//! recompute of profiles into a new index (`recompute plan|run|verify|promote|rollback|cleanup`).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use pulse_service::{ops, Readiness, Shutdown};
use pulse_speed::config::SpeedConfig;
use pulse_speed::recompute::{self, RecomputeArgs};
use pulse_speed::store::{EsArgs, ProfileStore};

#[derive(Parser)]
#[command(
    name = "pulse-speed",
    about = "Pulse speed layer: live profiles in Elasticsearch",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume `events`, keep profiles, fire triggers, flush to Elasticsearch.
    Run(Box<SpeedConfig>),
    /// Create the index template, the versioned index and its alias (idempotent).
    Setup {
        #[command(flatten)]
        es: EsArgs,
        #[arg(long, env = "PULSE_PROFILES_SHARDS", default_value_t = 1)]
        shards: u32,
        /// 0 on one local node; 1+ in production.
        #[arg(long, env = "PULSE_PROFILES_REPLICAS", default_value_t = 0)]
        replicas: u32,
    },
    /// Rebuild profiles from the archive and Kafka into a new index; promote; roll back.
    #[command(subcommand)]
    Recompute(Recompute),
    /// Identity unification: undo a merge.
    #[command(subcommand)]
    Identities(Identities),
}

#[derive(Subcommand)]
enum Identities {
    /// Split a device from the person it was merged into, exactly as the two would be
    /// without the link, and never link it again (the live speed layer stopped, as for a
    /// promote). Prints what it wrote as JSON.
    Unlink(Box<recompute::unlink::UnlinkArgs>),
}

#[derive(Subcommand)]
enum Recompute {
    /// Print what a run would read per partition; exit 2 on a retention gap.
    Plan(Box<RecomputeArgs>),
    /// Build (or resume) the index up to the live layer's commit.
    Run(Box<RecomputeArgs>),
    /// Compare every document of the index with the live one; exit 1 on unexpected changes.
    Verify {
        #[command(flatten)]
        args: Box<RecomputeArgs>,
        /// A field allowed to differ (after a model change: its fields); repeatable.
        #[arg(long = "expect-changed")]
        expect_changed: Vec<String>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// With the live layer stopped: catch the index up to its final commit, move the alias.
    Promote(Box<RecomputeArgs>),
    /// With the live layer stopped: catch the previous index up, move the alias back.
    Rollback(Box<RecomputeArgs>),
    /// Delete the profiles indices no alias points to (not the rollback's), and their groups.
    Cleanup {
        #[command(flatten)]
        args: Box<recompute::CleanupArgs>,
        /// Print the report as JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    pulse_core::telemetry::init_tracing();
    match Cli::parse().command {
        Command::Setup {
            es,
            shards,
            replicas,
        } => {
            pulse_core::telemetry::exit_on_panic();
            let rt = tokio::runtime::Runtime::new()?;
            let store = ProfileStore::new(&es)?;
            for line in rt.block_on(store.setup(shards, replicas))? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Run(config) => run(*config),
        Command::Recompute(command) => recompute(command),
        Command::Identities(Identities::Unlink(args)) => {
            pulse_core::telemetry::exit_on_panic_with(recompute::record_panic);
            let report = recompute::unlink::unlink(&args, Shutdown::on_signals())?;
            println!("{}", serde_json::to_value(&report)?);
            Ok(())
        }
    }
}

fn recompute(command: Recompute) -> anyhow::Result<()> {
    // A run that panics on a record journals it, as the live layer does: the next run passes
    // it over (the live layer dead-lettered it) instead of panicking there at every resume.
    // The journal is the one of the index being folded, which a rollback only learns later.
    pulse_core::telemetry::exit_on_panic_with(recompute::record_panic);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Only the commands that fold take SIGTERM as "flush, commit, stop"; the others
    // (plan, verify, cleanup) only read or delete and end at once on it, as by default.
    let stop = match &command {
        Recompute::Run(_) | Recompute::Promote(_) | Recompute::Rollback(_) => {
            Shutdown::on_signals()
        }
        _ => Shutdown::new(),
    };
    let print = |value: serde_json::Value| println!("{value}");
    match command {
        Recompute::Plan(args) => {
            let plan = rt.block_on(recompute::plan::preview(&args))?;
            let rate = (args.max_events_per_sec > 0).then_some(args.max_events_per_sec as f64);
            print!("{}", plan.render(rate));
            if let Err(e) = plan.check() {
                eprintln!("refused: {e}");
                std::process::exit(2);
            }
        }
        Recompute::Verify {
            args,
            expect_changed,
            json,
        } => {
            let report = rt.block_on(recompute::verify(&args, &expect_changed))?;
            match json {
                true => print(serde_json::to_value(&report)?),
                false => print!("{}", report.render()),
            }
            if !report.ok() {
                std::process::exit(1);
            }
        }
        Recompute::Run(args) => print(serde_json::to_value(recompute::run(&args, stop)?)?),
        Recompute::Promote(args) => print(serde_json::to_value(recompute::promote(&args, stop)?)?),
        Recompute::Rollback(args) => {
            print(serde_json::to_value(recompute::rollback(&args, stop)?)?)
        }
        Recompute::Cleanup { args, json } => {
            let report = rt.block_on(recompute::cleanup(&args))?;
            match json {
                true => print(serde_json::to_value(&report)?),
                false => print!("{}", report.render()),
            }
        }
    }
    Ok(())
}

fn run(config: SpeedConfig) -> anyhow::Result<()> {
    // A panic anywhere ends the process (so it is restarted), after journaling the record
    // being folded, which the restart dead-letters instead of folding it again.
    let journal = config.poison_journal();
    pulse_core::telemetry::exit_on_panic_with(move |message| journal.record_panic(message));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let stop = Shutdown::on_signals();
    let ready = Readiness::with_heartbeat("elasticsearch unavailable", Readiness::STALL_AFTER);
    let handle = ops::recorder(&[]);
    let (listen, endpoint_ready, endpoint_stop) =
        (config.metrics_listen, ready.clone(), stop.clone());
    rt.spawn(async move {
        if let Err(e) = ops::serve(listen, handle, endpoint_ready, endpoint_stop).await {
            tracing::error!(error = %e, %listen, "metrics endpoint failed");
        }
    });
    let summary = pulse_speed::engine::run(&config, stop, ready)?;
    tracing::info!(?summary, "speed layer stopped");
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
