//! The `caseroom` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "caseroom",
    version,
    about = "A project tracker as live group chat: an XMPP MUC component"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect to the XMPP server and serve the rooms.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and print what is wrong, by key.
    CheckConfig {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Copy the database (and the linked-tokens file) while caseroom runs: one consistent snapshot,
    /// everything committed before it began.
    Backup {
        /// The TOML configuration file (for the store's paths).
        #[arg(long, short)]
        config: PathBuf,
        /// The new file to write (never overwritten).
        #[arg(long)]
        to: PathBuf,
    },
    /// Delete archived messages older than a time, now (the daily `store.retention` does it on its
    /// own). Runs inside the running caseroom if there is one (it owns the rooms' history in memory).
    Prune {
        /// The TOML configuration file (for the store's path).
        #[arg(long, short)]
        config: PathBuf,
        /// Age beyond which messages go, e.g. "90d".
        #[arg(long)]
        older_than: String,
        /// Only this room.
        #[arg(long)]
        room: Option<String>,
        /// Say what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Put a backup in place of the database; caseroom must be stopped. The replaced database is
    /// kept beside it as `<path>.before-restore-<time>`.
    Restore {
        /// The TOML configuration file (for the store's paths).
        #[arg(long, short)]
        config: PathBuf,
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CASEROOM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // One JSON object per line for log collectors (Loki, Elasticsearch, journald's JSON export).
    if std::env::var("CASEROOM_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caseroom: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// Long by design: one arm per subcommand, each a few lines of parsing and printing.
fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::CheckConfig { config } => {
            caseroom::config::Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Cmd::Backup { config, to } => {
            let cfg = caseroom::config::Config::load(&config)?;
            sqlite_only(&cfg, "backup", "pg_dump")?;
            let r = caseroom::store::ops::backup(&cfg.store.path, &cfg.store.tokens_path(), &to)
                .with_context(|| format!("backing up {}", cfg.store.path.display()))?;
            println!(
                "{}: {} bytes, {} archived messages, {} webhook deliveries, in {} ms",
                to.display(),
                r.bytes,
                r.messages,
                r.deliveries,
                r.took.as_millis()
            );
            if let Some(t) = r.tokens {
                println!("{}: linked tokens (mode 0600; keep it secret)", t.display());
            }
            Ok(())
        }
        Cmd::Prune {
            config,
            older_than,
            room,
            dry_run,
        } => {
            use caseroom::store::prune::{prune_cli, PrunePlan, PrunedBy};
            let cfg = caseroom::config::Config::load(&config)?;
            sqlite_only(
                &cfg,
                "prune",
                "store.retention (applied daily by the running caseroom)",
            )?;
            let age = caseroom::config::duration::parse(&older_than)
                .map_err(|e| anyhow::anyhow!("--older-than: {e}"))?;
            let now = chrono::Utc::now().timestamp_micros();
            let plan = PrunePlan {
                messages_before: Some(now.saturating_sub(age.as_micros() as i64)),
                only_room: room,
                ..PrunePlan::default()
            };
            let (tally, by) = prune_cli(&cfg.store.path, plan, dry_run)
                .with_context(|| format!("pruning {}", cfg.store.path.display()))?;
            let verb = match by {
                PrunedBy::DryRun => "would delete",
                PrunedBy::ThisProcess => "deleted",
                PrunedBy::RunningService => "deleted (by the running caseroom)",
            };
            println!("{verb} {tally}");
            Ok(())
        }
        Cmd::Restore { config, from } => {
            let cfg = caseroom::config::Config::load(&config)?;
            sqlite_only(&cfg, "restore", "pg_restore")?;
            let r = caseroom::store::ops::restore(&cfg.store.path, &cfg.store.tokens_path(), &from)
                .with_context(|| format!("restoring {}", from.display()))?;
            println!(
                "{} restored to {} (schema {}; migrated at the next start if older){}",
                from.display(),
                cfg.store.path.display(),
                r.schema,
                if r.tokens {
                    ", with its linked tokens"
                } else {
                    ""
                }
            );
            if let Some(old) = r.set_aside {
                println!("the database it replaced is kept as {}", old.display());
            }
            Ok(())
        }
        Cmd::Run { config } => {
            let cfg = caseroom::config::Config::load(&config)?;
            let rt = match cfg.runtime.worker_threads {
                0 | 1 => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build(),
                n => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(n)
                    .enable_all()
                    .build(),
            }
            .context("starting the async runtime")?;
            rt.block_on(async move {
                let http = bind(&cfg.http.listen)
                    .await
                    .with_context(|| format!("binding http.listen {}", cfg.http.listen))?;
                // On a worker like the tasks it talks to (the link, the HTTP server), not beside
                // them on the main thread: with one thread, a stanza crosses no thread.
                tokio::spawn(caseroom::run(
                    cfg,
                    caseroom::Listeners { http },
                    shutdown_signal(),
                ))
                .await
                .context("the main task panicked")??;
                Ok(())
            })
        }
    }
}

/// The HTTP port, bound now (a taken port is an error at start) and listened on once this instance
/// serves (`caseroom::Listeners`). SO_REUSEADDR as `TcpListener::bind` sets it, so a restart is not
/// refused by the last run's connections in TIME_WAIT.
async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpSocket> {
    let addr = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    })?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The store commands work on the SQLite file; with `store.url` they would touch a file caseroom
/// does not use, so they refuse and name PostgreSQL's own tool.
fn sqlite_only(cfg: &caseroom::config::Config, what: &str, instead: &str) -> anyhow::Result<()> {
    if cfg.store.url.is_some() {
        anyhow::bail!(
            "caseroom {what} works on the SQLite store; this config keeps the store in PostgreSQL (store.url): use {instead}"
        );
    }
    Ok(())
}
