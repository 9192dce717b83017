//! `meterline`: the operator command.
//!
//! `meterline setup` is what `dev/up` and the Helm migration Job run: it creates every topic
//! (and its `.dlq` twin) and applies the PostgreSQL and ClickHouse migrations. Each step is
//! idempotent, so running it on every deploy is safe. `meterline token` mints a bearer token
//! for a tenant and environment (development and operations); `meterline rotate-keys`
//! re-encrypts stored secrets under the newest encryption key; `meterline prune` applies the
//! retention of the sync ledger and webhook deduplication records; `meterline dlq` lists,
//! inspects and replays dead-lettered messages; `meterline migrate --relayout-events` converts
//! an `events_processed` created before migration 5 to the time-ordered layout.

use std::process::ExitCode;
use std::time::Duration;

mod dlq;
mod error;

use clap::{Parser, Subcommand};
use meterline_accounts::crypto::Keyring;
use meterline_accounts::stripe_config::StripeConfigStore;
use meterline_common::auth::{JwtKeys, TenantScope};
use meterline_common::config::{
    ClickhouseSettings, ConfigError, Env, KafkaSettings, PostgresSettings, ProcessEnv,
};
use meterline_common::kafka::{self, Topics};
use meterline_common::retention;
use meterline_common::{clickhouse, postgres};
use meterline_schemas::{EnvironmentId, TenantId};

#[derive(Parser)]
#[command(name = "meterline", version, about = "meterline operator command")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the topics and apply every migration (what a deploy runs).
    Setup {
        #[command(flatten)]
        topics: TopicArgs,
    },
    /// Create the topics that do not exist yet (KAFKA_BROKERS, TOPIC_PREFIX).
    Topics {
        #[command(flatten)]
        topics: TopicArgs,
    },
    /// Apply the PostgreSQL (DATABASE_URL) and ClickHouse (CLICKHOUSE_URL,
    /// CLICKHOUSE_DATABASE, and CLICKHOUSE_CLUSTER with its engine and nodes on a sharded
    /// cluster) migrations not yet applied; with RETENTION_EVENTS_DAYS, set the
    /// events_processed TTL to it.
    Migrate {
        /// Print the ClickHouse statements a new install runs on the configured server or
        /// cluster, in order, and where each runs; connect to nothing and change nothing.
        #[arg(long, conflicts_with = "relayout_events")]
        print_ddl: bool,
        /// Convert an events_processed with rows to the time-ordered layout (a window total
        /// then reads only its window's rows). Refused while any aggregator runs (its
        /// consumer group AGGREGATOR_GROUP_ID on KAFKA_BROKERS has members); the old table
        /// is kept under another name, printed.
        #[arg(long)]
        relayout_events: bool,
    },
    /// Delete completed sync-ledger rows older than RETENTION_LEDGER_DAYS (default 400),
    /// webhook deduplication records older than RETENTION_WEBHOOK_DELIVERIES_DAYS (default
    /// 90) and finished window registry rows older than RETENTION_WINDOWS_DAYS (default 400);
    /// none may be under 42 days. Each service also does this for its own table every hour.
    Prune,
    /// Re-encrypt every stored Stripe key and webhook secret under the first key of
    /// ENCRYPTION_KEYS (after putting a new key first; the old one may then be removed).
    RotateKeys,
    /// Dead-letter topics: list, inspect and replay messages after the cause was fixed
    /// (KAFKA_BROKERS, TOPIC_PREFIX).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Print a bearer token (HS256, signed with JWT_SECRET) for a tenant and environment.
    Token {
        /// The tenant the token acts for.
        #[arg(long)]
        tenant: String,
        /// The tenant's environment.
        #[arg(long)]
        environment: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Who the token is for (recorded in audit trails).
        #[arg(long)]
        subject: Option<String>,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// One line per message not yet replayed (with --all, every message still retained):
    /// partition, offset, replayed or pending, error kind, when it failed, key, reason.
    List {
        /// The dead-letter topic, such as usage.raw.dlq (TOPIC_PREFIX is added).
        topic: dlq::DlqTopic,
        /// Also the messages already replayed.
        #[arg(long)]
        all: bool,
        /// The most messages shown.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Every header, the key and the payload of one message.
    Inspect {
        topic: dlq::DlqTopic,
        #[arg(long)]
        partition: i32,
        #[arg(long)]
        offset: i64,
    },
    /// Write every message not yet replayed back to its source topic (original key and
    /// bytes), and remember that it was; a second run replays only what arrived since.
    Replay {
        topic: dlq::DlqTopic,
        /// Show what would be replayed; write nothing and remember nothing.
        #[arg(long)]
        dry_run: bool,
        /// The most messages replayed by this run (the rest stay for the next).
        #[arg(long, default_value_t = usize::MAX)]
        limit: usize,
    },
}

#[derive(clap::Args)]
struct TopicArgs {
    /// Partitions of each new topic.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    partitions: i32,
    /// Replication factor of each new topic.
    #[arg(long, env = "TOPIC_REPLICATION", default_value_t = 1)]
    replication: i32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("meterline: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once: some of our errors already say the causes under them.
            let error: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("meterline: {}", meterline_common::error::with_causes(error));
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let env = Env::new(&ProcessEnv);
    match command {
        Command::Setup { topics } => {
            create_topics(&env, &topics).await?;
            migrate(&env, false).await
        }
        Command::Topics { topics } => create_topics(&env, &topics).await,
        Command::Migrate {
            print_ddl: true, ..
        } => print_ddl(&env),
        Command::Migrate {
            relayout_events, ..
        } => migrate(&env, relayout_events).await,
        Command::Prune => {
            use anyhow::Context;
            // Each table's rule lives with the service that owns it; this runs each once.
            let (ledger, deliveries) = (
                &stripe_sink::ledger::retention::LEDGER,
                &webhook_relay::deliveries::DELIVERIES,
            );
            let ledger_days = ledger.retention_from_env(&env)?;
            let deliveries_days = deliveries.retention_from_env(&env)?;
            // Every retention is read before anything is deleted: one under the floor
            // refuses the whole run.
            let windows = &aggregator::windows::WINDOWS;
            let windows_days = windows.retention_from_env(&env)?;
            let pool = postgres::pool(&PostgresSettings::from_env(&env)?, 2)?;
            let now = time::OffsetDateTime::now_utc();
            let ledger = ledger
                .prune(&pool, ledger_days, now)
                .await
                .context(ledger.context)?;
            let deliveries = (deliveries.prune(&pool, deliveries_days, now).await)
                .context(deliveries.context)?;
            // Subscription periods are kept as long as the ledger whose windows they bill.
            let periods = &meterline_catalog::billing_periods::PERIODS;
            let periods =
                (periods.prune(&pool, ledger_days, now).await).context(periods.context)?;
            let windows =
                (windows.prune(&pool, windows_days, now).await).context(windows.context)?;
            println!(
                "pruned {ledger} sync ledger row(s) older than {} days, {periods} subscription \
                 period(s) that ended before then, {deliveries} webhook delivery record(s) \
                 older than {} days, and {windows} window registry row(s) older than {} days",
                ledger_days.days(),
                deliveries_days.days(),
                windows_days.days()
            );
            Ok(())
        }
        Command::RotateKeys => {
            use anyhow::Context;
            let keys = Keyring::from_env(&env)?;
            let pool = postgres::pool(&PostgresSettings::from_env(&env)?, 2)?;
            let changed = StripeConfigStore::new(pool, keys.clone())
                .rotate_keys()
                .await
                .context("re-encrypting stripe configs")?;
            println!(
                "re-encrypted {changed} stripe config(s) under key {}",
                keys.primary_id()
            );
            Ok(())
        }
        Command::Dlq { command } => run_dlq(&env, command).await,
        Command::Token {
            tenant,
            environment,
            ttl,
            subject,
        } => {
            let keys = JwtKeys::from_env(&env)?;
            // A token the services would refuse is no use to anyone: say so now.
            let max = keys.max_lifetime().as_secs();
            if ttl > max {
                anyhow::bail!(
                    "--ttl {ttl} is longer than the services accept (JWT_MAX_LIFETIME_HOURS: {} h = {max} s)",
                    max / 3600
                );
            }
            let scope = TenantScope {
                tenant_id: TenantId::parse(&tenant)?,
                environment_id: EnvironmentId::parse(&environment)?,
                subject,
            };
            println!("{}", keys.mint(&scope, Duration::from_secs(ttl)));
            Ok(())
        }
    }
}

async fn run_dlq(env: &Env<'_>, command: DlqCommand) -> anyhow::Result<()> {
    let settings = KafkaSettings::from_env(env)?;
    match command {
        DlqCommand::List { topic, all, limit } => {
            let reader = dlq::DlqReader::new(&settings, topic)?;
            let letters = reader.list(all, limit).await?;
            println!("partition\toffset\tstate\tkind\tfailed_at\tkey\terror");
            for letter in &letters {
                println!("{}", letter.summary());
            }
            eprintln!("{} message(s) on {}", letters.len(), reader.dlq_name());
        }
        DlqCommand::Inspect {
            topic,
            partition,
            offset,
        } => {
            let reader = dlq::DlqReader::new(&settings, topic)?;
            println!("topic: {}", reader.dlq_name());
            println!("{}", reader.inspect(partition, offset).await?);
        }
        DlqCommand::Replay {
            topic,
            dry_run,
            limit,
        } => {
            let reader = dlq::DlqReader::new(&settings, topic)?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            let count = reader
                .replay(&settings, dry_run, limit, |letter| {
                    println!("{verb}\t{}", letter.summary());
                })
                .await?;
            println!(
                "{count} message(s) {verb} from {} to {}",
                reader.dlq_name(),
                reader.source_name()
            );
        }
    }
    Ok(())
}

async fn create_topics(env: &Env<'_>, args: &TopicArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let settings = KafkaSettings::from_env(env)?;
    let names = Topics::new(settings.topic_prefix.clone()).all();
    kafka::ensure_topics(&settings, &names, args.partitions, args.replication)
        .await
        .context("creating topics")?;
    println!("topics ready: {}", names.join(", "));
    Ok(())
}

/// `meterline migrate --print-ddl`: each statement ends in `;` and is preceded by a comment
/// saying where it runs, so the output can be reviewed or piped to `clickhouse-client`.
fn print_ddl(env: &Env<'_>) -> anyhow::Result<()> {
    let ch = ClickhouseSettings::from_env(env)?;
    for step in clickhouse::planned_ddl(&ch)? {
        let place = match step.target {
            clickhouse::Target::Once => "once",
            clickhouse::Target::EveryNode => "on every node of CLICKHOUSE_CLUSTER_NODES",
        };
        println!("-- {place}\n{};\n", step.sql.trim());
    }
    Ok(())
}

async fn migrate(env: &Env<'_>, relayout_events: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let pg = PostgresSettings::from_env(env)?;
    let ch = ClickhouseSettings::from_env(env)?;
    // Read before anything changes, so a bad value (exit 2) leaves the databases untouched.
    let events_ttl = retention::events_ttl_from_env(env)?;
    let relayout = relayout_events
        .then(|| {
            anyhow::Ok((
                KafkaSettings::from_env(env)?,
                aggregator::config::group_id_from_env(env),
            ))
        })
        .transpose()?;
    let pool = postgres::pool(&pg, 2)?;
    postgres::migrate(&pool)
        .await
        .context("applying postgres migrations")?;
    println!("postgres migrations applied");
    let ran = clickhouse::migrate(&ch)
        .await
        .context("applying clickhouse migrations")?;
    println!(
        "clickhouse migrations applied (new this run: {})",
        if ran.is_empty() {
            "none".to_owned()
        } else {
            ran.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    match (clickhouse::events_layout(&ch).await?, relayout) {
        (clickhouse::EventsLayout::ByTime, _) => {}
        (clickhouse::EventsLayout::ById { rows }, None) => println!(
            "events_processed keeps the layout ordered by event id ({rows} rows): every window \
             total reads the customer's whole history. Stop the aggregator and run \
             `meterline migrate --relayout-events` to order it by time"
        ),
        (clickhouse::EventsLayout::ById { .. }, Some((kafka_settings, group))) => {
            let members = kafka::group_members(&kafka_settings, &group)
                .await
                .context("asking Kafka whether an aggregator runs")?;
            anyhow::ensure!(
                members == 0,
                "{members} aggregator(s) still run in consumer group {group}: rows they write \
                 during the copy would be left behind. Stop every aggregator (e.g. scale it to \
                 0) and run again; nothing was changed"
            );
            let done = clickhouse::relayout_events(&ch)
                .await
                .context("converting events_processed")?;
            if let Some(done) = done {
                println!(
                    "events_processed ordered by time: {} rows copied",
                    done.rows
                );
                if let Some(old) = done.kept_as {
                    println!(
                        "the old table is kept as {old}; drop it once satisfied: DROP TABLE {old}"
                    );
                }
            }
        }
    }
    if let Some(days) = events_ttl {
        retention::set_events_ttl(&ch, days)
            .await
            .context("setting the events_processed ttl")?;
        println!("events_processed ttl: {} days", days.days());
    }
    Ok(())
}
