//! `scoretap`: a transparent capture proxy for ML scoring endpoints.

mod demo;
mod settings;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use scoretap_core::BoundServer;
use settings::{LogFormat, RunArgs, RunSettings};

/// Put scoretap in front of a scoring endpoint: clients talk to its port, nothing changes in the
/// scoring service.
#[derive(Debug, Parser)]
#[command(
    name = "scoretap",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (what bare flags do too)
    Run(Box<RunArgs>),
    /// Start a built-in scoring endpoint with scoretap in front, send requests through it, and
    /// show what happened
    Demo(demo::DemoArgs),
    /// Print recorded exchanges from a store, newest first, as JSON lines
    Traces(TracesArgs),
}

/// `scoretap traces`'s flags.
#[derive(Debug, clap::Args)]
struct TracesArgs {
    /// The store to read, as given to `run --store` (file:///DIR, s3://BUCKET/PREFIX or az://CONTAINER/PREFIX)
    #[arg(long, env = "SCORETAP_STORE", value_name = "URL", value_parser = settings::parse_store, default_value = "file://./scoretap-data")]
    store: scoretap_core::sink::StoreLocation,
    /// Where batches are, as given to `run --trace-key-template` (its text before the first field is listed)
    #[arg(long, env = "SCORETAP_TRACE_KEY_TEMPLATE", value_name = "TEMPLATE", default_value = scoretap_core::storage::key::DEFAULT_TRACE_TEMPLATE)]
    trace_key_template: String,
    /// Endpoint of an S3-compatible store (else AWS_ENDPOINT_URL, else AWS)
    #[arg(long, env = "SCORETAP_S3_ENDPOINT", value_name = "URL", value_parser = settings::parse_endpoint)]
    s3_endpoint: Option<String>,
    /// S3 region (else AWS_REGION, the profile, or us-east-1)
    #[arg(long, env = "SCORETAP_S3_REGION", value_name = "REGION")]
    s3_region: Option<String>,
    /// Azure Blob endpoint (else from AZURE_STORAGE_* variables)
    #[arg(long, env = "SCORETAP_AZURE_ENDPOINT", value_name = "URL", value_parser = settings::parse_endpoint)]
    azure_endpoint: Option<String>,
    /// Only records whose JSON contains this text
    #[arg(long, value_name = "TEXT")]
    contains: Option<String>,
    /// At most this many records
    #[arg(long, value_name = "COUNT", default_value_t = 10)]
    limit: usize,
    /// Only records that started within this long, e.g. 15m or 1h
    #[arg(long, value_name = "DURATION", value_parser = settings::parse_duration)]
    since: Option<std::time::Duration>,
    /// Only responses with this status class (5xx) or status (503)
    #[arg(long, value_name = "STATUS", value_parser = scoretap_core::query::StatusFilter::parse)]
    status: Option<scoretap_core::query::StatusFilter>,
    /// Only records of this service (`run --service`)
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
}

/// mimalloc: per-thread heaps suit a proxy whose buffers are allocated on the workers and freed
/// on the collector thread (glibc's arenas contend there).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for configuration errors, as clap uses for bad flags.
const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(error),
    };
    match cli.command {
        Some(Command::Demo(args)) => {
            init_logging(LogFormat::Text, "warn");
            run_async(demo::run(args))
        }
        Some(Command::Run(args)) => run(*args),
        Some(Command::Traces(args)) => traces(args),
        None => run(cli.run),
    }
}

/// Prints a command-line error as clap words it, with credentials redacted: clap quotes a
/// refused value back (`invalid value 'https://user:password@host'`, a SAS's `sig=`).
fn usage_error(error: clap::Error) -> ExitCode {
    if !error.use_stderr() {
        // --help and --version: not errors, printed to stdout.
        error.exit();
    }
    eprint!(
        "{}",
        scoretap_core::storage::remote::sanitize(&error.render().to_string())
    );
    ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(USAGE_ERROR))
}

fn run(args: RunArgs) -> ExitCode {
    let check_only = args.check_config.unwrap_or(false);
    let settings = match args.resolve() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    if check_only {
        return match serde_json::to_string_pretty(&settings) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: cannot print the configuration: {error}");
                ExitCode::FAILURE
            }
        };
    }
    init_logging(settings.log_format, &settings.log_level);
    run_async(serve(settings))
}

fn traces(args: TracesArgs) -> ExitCode {
    use scoretap_core::sink::StoreLocation;
    let query = scoretap_core::query::TraceQuery {
        contains: args.contains,
        limit: args.limit,
        since: args.since,
        status: args.status,
        service: args.service,
    };
    let result = match &args.store {
        StoreLocation::Stdout => {
            eprintln!("error: invalid value for '--store <URL>': records sent to stdout cannot be read back; give the store's URL");
            return ExitCode::from(USAGE_ERROR);
        }
        StoreLocation::Directory(root) => scoretap_core::query::query_directory(
            root,
            scoretap_core::query::template_directory(&args.trace_key_template),
            &query,
        )
        .map_err(|error| format!("cannot read the store {}: {error}", root.display())),
        remote => {
            let options = scoretap_core::storage::remote::RemoteOptions {
                s3_force_path_style: args.s3_endpoint.is_some(),
                s3_endpoint: args.s3_endpoint.clone(),
                s3_region: args.s3_region.clone(),
                azure_endpoint: args.azure_endpoint.clone(),
                ..Default::default()
            };
            let prefix =
                scoretap_core::query::template_directory(&args.trace_key_template).to_owned();
            let store = remote.clone();
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(async move {
                    let store =
                        scoretap_core::storage::remote::RemoteStore::connect(&store, &options)
                            .await
                            .map_err(|error| error.to_string())?;
                    scoretap_core::query::query_remote(&store, &prefix, &query)
                        .await
                        .map_err(|error| format!("cannot read the store: {error}"))
                }),
                Err(error) => Err(format!("cannot start: {error}")),
            }
        }
    };
    match result {
        Ok(found) => {
            use std::io::Write;
            if found.records.is_empty() {
                // On stderr: stdout stays a clean stream of records for pipes.
                eprintln!("0 records matched ({} searched)", found.searched);
            }
            let mut out = std::io::stdout().lock();
            for line in found.records {
                if writeln!(out, "{line}").is_err() {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run_async(future: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("scoretap-worker")
        .build()
    {
        Ok(runtime) => runtime.block_on(future),
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: RunSettings) -> ExitCode {
    let server = match BoundServer::bind(settings.server_settings()).await {
        Ok(server) => server,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        listen = %server.proxy_address(),
        admin = %server.admin_address(),
        upstream = %settings.upstream,
        service = %settings.service,
        tls = settings.tls_cert.is_some(),
        capture = settings.capture,
        // Store URLs carry no credentials (a query is refused when they are parsed).
        store = %settings.store.url(),
        spool = %if settings.store.is_remote() {
            settings.spool_dir.display().to_string()
        } else {
            "none (a local store)".to_owned()
        },
        version = env!("CARGO_PKG_VERSION"),
        "scoretap is serving"
    );
    server.run(shutdown_signal()).await;
    ExitCode::SUCCESS
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
        }
        Err(error) => {
            tracing::warn!("cannot listen for SIGTERM ({error}); stopping on SIGINT only");
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(error) = result {
        eprintln!("warning: logging not initialised: {error}");
    }
}
