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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CASEROOM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caseroom: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::CheckConfig { config } => {
            caseroom::config::Config::load(&config)?;
            println!("{}: ok", config.display());
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
                let http = tokio::net::TcpListener::bind(&cfg.http.listen)
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
