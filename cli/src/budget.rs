//! `herald budget`: prints the Postgres and Redis connections a process of
//! the given kind may hold at once ([`herald::budget`]), and the totals for
//! a number of them. It reads the configuration only and connects nowhere.

use clap::{Args, ValueEnum};
use herald::budget::{Budget, Services};
use herald::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Run,
    Relay,
    Worker,
    Scheduler,
    Admin,
}

#[derive(Debug, Args)]
pub struct BudgetArgs {
    /// The command the processes run.
    #[arg(
        long = "for",
        value_enum,
        default_value = "run",
        value_name = "COMMAND"
    )]
    kind: Kind,
    /// With relay, worker or scheduler: the process also serves the admin
    /// server (--admin).
    #[arg(long)]
    admin: bool,
    /// How many such processes run against the same Postgres and Redis.
    #[arg(long, default_value_t = 1, value_name = "N")]
    processes: usize,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn budget(config: &Config, args: BudgetArgs) -> anyhow::Result<()> {
    let services = match args.kind {
        Kind::Run => Services::run(config),
        Kind::Relay => Services {
            relay: true,
            admin: args.admin,
            ..Services::default()
        },
        Kind::Worker => Services {
            worker: true,
            admin: args.admin,
            ..Services::default()
        },
        Kind::Scheduler => Services {
            scheduler: true,
            admin: args.admin,
            ..Services::default()
        },
        Kind::Admin => Services {
            admin: true,
            ..Services::default()
        },
    };
    let budget = Budget::of(config, services);
    let checked = budget.check();
    let n = args.processes;
    if args.json {
        let value = serde_json::json!({
            "process": budget,
            "processes": n,
            "postgres_total": budget.fleet_postgres(n),
            "redis_total": budget.redis * n,
            "note": budget.handler_note(),
            "error": checked.as_ref().err().map(|e| e.to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", budget.table());
        if let Some(note) = budget.handler_note() {
            println!("\nnote: {note}");
        }
        println!(
            "\n{n} process(es): at most {} Postgres connections (keep Postgres max_connections \
             above this plus your applications' and superuser_reserved_connections) and {} \
             Redis connections (Redis maxclients, e.g. 20 on small managed plans); one \
             maintenance leader among them.",
            budget.fleet_postgres(n),
            budget.redis * n
        );
    }
    checked?;
    Ok(())
}
