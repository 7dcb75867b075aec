//! The `eps` binary: parses the command line, sets up logging, runs one part, maps errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use eps::cli::{Cli, Command, LogFormat, ProcessRun, StatusOptions};
use eps::log::LogBackend;
use eps::{client, demo, processor, server};

fn main() -> ExitCode {
    // The configuration file feeds clap's environment fallbacks, so it is applied before the real
    // parse, for the command being run (a first parse only finds out which one that is).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let early_json = json_logs_requested(&args);
    let file = match eps::config::config_path_from_args(&args).map(|p| eps::config::FileConfig::load(&p)).transpose() {
        Ok(file) => file,
        Err(e) => return fatal(early_json, &e.to_string(), 2),
    };
    if let (Some(file), Ok(first)) = (&file, Cli::try_parse_from(&args)) {
        if let Err(e) = file.apply(first.command.name()) {
            return fatal(early_json, &e.to_string(), 2);
        }
    }
    let cli = Cli::parse_from(args);
    let json = matches!(cli.log_format, LogFormat::Json);
    if let Command::Config = cli.command {
        return match eps::config::describe(file.as_ref()) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fatal(json, &e.to_string(), 2),
        };
    }
    if let Command::Completions(args) = &cli.command {
        clap_complete::generate(
            args.shell,
            &mut <Cli as clap::CommandFactory>::command(),
            "eps",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    if let Command::Man(args) = &cli.command {
        return match man_pages(args.dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fatal(json, &e, 1),
        };
    }
    init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fatal(json, &format!("cannot start the async runtime: {e}"), 1),
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            let code = if e.downcast_ref::<eps::error::ConfigError>().is_some() { 2 } else { 1 };
            fatal(json, &format!("{e:#}"), code)
        }
    }
}

/// The last line of a failed run: `eps: error: …` as text, or under `--log-format json` one JSON
/// line shaped like every other log line (level ERROR, the error as its message, the exit code as a
/// number), so a log pipeline that parses JSON does not drop the one line that says why eps stopped.
/// It is written whatever the log filter, like the text line.
fn fatal(json: bool, message: &str, code: u8) -> ExitCode {
    if json {
        let subscriber = tracing_subscriber::fmt().json().with_writer(std::io::stderr).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, || tracing::error!(exit_code = code, "eps: error: {message}"));
    } else {
        eprintln!("eps: error: {message}");
    }
    ExitCode::from(code)
}

/// Whether `--log-format json` (or `EPS_LOG_FORMAT=json`) was asked for, read before the real parse
/// for errors that happen before it.
fn json_logs_requested(args: &[std::ffi::OsString]) -> bool {
    let mut iter = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(arg) = iter.next() {
        if arg == "--log-format" {
            return iter.next().is_some_and(|v| v == "json");
        }
        if let Some(value) = arg.strip_prefix("--log-format=") {
            return value == "json";
        }
    }
    std::env::var("EPS_LOG_FORMAT").is_ok_and(|v| v == "json")
}

/// `eps man`: eps(1) on stdout, or with `dir` eps.1 and one page per command (eps-server.1, ...) there.
fn man_pages(dir: Option<&std::path::Path>) -> Result<(), String> {
    let command = <Cli as clap::CommandFactory>::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .map_err(|e| format!("cannot write the man pages in {}: {e}", dir.display()))
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(command).render(&mut out).map_err(|e| format!("cannot render the man page: {e}"))?;
            std::io::Write::write_all(&mut std::io::stdout(), &out)
                .map_err(|e| format!("cannot write the man page: {e}"))
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Server(args) => serve(args.into()).await,
        Command::Process(args) => {
            // As for the server: a signal during start-up is a graceful stop, not the default kill.
            let shutdown = server::shutdown_signal();
            if let Some(addr) = args.metrics_listen {
                let bound = eps::telemetry::serve_metrics(addr).await?;
                println!("eps process metrics on http://{bound}/metrics");
            }
            match ProcessRun::from(args) {
                ProcessRun::File(opts) => println!("{}", processor::run(opts, shutdown).await?),
                ProcessRun::JetStream(opts) => println!("{}", processor::jetstream::run(opts, shutdown).await?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Client(args) => send(args.into()).await,
        Command::Status(args) => {
            let opts = StatusOptions::from(args);
            match &opts.log {
                LogBackend::JetStream(nats) => {
                    print_status(&processor::jetstream::status(nats, opts.database_url.as_deref()).await?, opts.json)
                }
                LogBackend::File => print_status(
                    &eps::ops::status(&opts.data_dir, opts.database_url.as_deref(), opts.allow_other_store).await?,
                    opts.json,
                ),
            }
        }
        Command::Compact(args) => {
            let opts = eps::ops::CompactOptions::from(args);
            let report = eps::ops::compact(&opts).await?;
            println!("{report}{}", if opts.dry_run { " (dry run: nothing removed)" } else { "" });
            Ok(ExitCode::SUCCESS)
        }
        Command::Config | Command::Completions(_) | Command::Man(_) => {
            unreachable!("handled before the runtime starts")
        }
        Command::Demo(args) => {
            demo::run(args.events).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `eps server`: binds, says where it listens (or that it is still recovering the log), serves until
/// a signal.
async fn serve(opts: server::ServerOptions) -> anyhow::Result<ExitCode> {
    // Signals are taken over before anything else: a SIGTERM during recovery, or just after the
    // "listening" line, is a graceful stop, never the default action's kill.
    let shutdown = server::shutdown_signal();
    let server = server::Server::bind(opts).await?;
    // Scripts and tests read this line to learn the port (useful with --listen 127.0.0.1:0). It
    // means ready: while a large log is still being recovered, another line comes first (the
    // server answers meanwhile, 503 to what needs the log).
    let (scheme, addr) = (server.scheme(), server.local_addr());
    let listening = move || println!("eps server listening on {scheme}://{addr}");
    match server.log_recovery() {
        None => listening(),
        Some(recovered) => {
            println!("eps server recovering the log on {scheme}://{addr}: 503 to what needs the log until it is open");
            tokio::spawn(async move {
                if recovered.await {
                    listening();
                }
            });
        }
    }
    server.run(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// `eps client`: sends the file, prints the summary, and on a stop where the run ended and how to
/// resume it.
async fn send(opts: client::ClientOptions) -> anyhow::Result<ExitCode> {
    let file = opts.file.clone();
    let summary = client::run_until(opts, client_stop_signal()).await?;
    println!("{summary}");
    if let Some(per_server) = summary.per_server_line() {
        println!("{per_server}");
    }
    if summary.failed_out > 0 {
        eprintln!("eps client: {} lines written to --failed-out", summary.failed_out);
    }
    if let Some(stopped) = &summary.stopped {
        eprintln!("eps client: {stopped}");
        if let Some((line, path)) = &summary.checkpoint {
            eprintln!(
                "eps client: lines 1 to {line} of {} are done; checkpoint saved in {}",
                file.display(),
                path.display()
            );
        }
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        eprintln!("eps client: to resume, run: {}", client::resume_command(&args));
        return Ok(ExitCode::from(stopped.exit_code()));
    }
    Ok(if summary.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `eps status`'s answer, as text or (`--json`) as JSON.
fn print_status(status: &(impl serde::Serialize + std::fmt::Display), json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
    } else {
        println!("{status}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The client's stop: the first SIGINT or SIGTERM ends the run gracefully (see `client::run_until`);
/// a second one ends the process at once, with the same exit code (the checkpoint saved so far stays
/// valid: it only ever covers acknowledged lines).
fn client_stop_signal() -> impl std::future::Future<Output = client::Stopped> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let (Some(mut term), Some(mut int)) = (term, int) else {
            return std::future::pending().await;
        };
        let first = tokio::select! {
            _ = int.recv() => 2,
            _ = term.recv() => 15,
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!("eps client: second signal: stopping now, without waiting for the requests in flight");
            std::process::exit(128 + first);
        });
        client::Stopped::Signal(first)
    }
}

fn init_tracing(cli: &Cli) {
    // The demo prints its own story; its parts' routine logs would drown it.
    let level = match cli.command {
        Command::Demo(_) if cli.log_level == "info" => "warn",
        _ => cli.log_level.as_str(),
    };
    let format = cli.log_format.into();
    // `--log-level` (or EPS_LOG_LEVEL, or the configuration file) wins; without it, RUST_LOG is used
    // as given, as in any tracing program; else the default, with the dependencies held to warnings.
    let filter = match std::env::var("RUST_LOG") {
        Ok(rust_log) if !log_level_given() && !rust_log.trim().is_empty() => rust_log,
        _ => eps::telemetry::quiet_dependencies(level),
    };
    eps::telemetry::init_tracing(&filter, format);
}

/// Whether the log level was set: `--log-level` on the command line, or EPS_LOG_LEVEL (which the
/// configuration file's `log-level` sets too).
fn log_level_given() -> bool {
    std::env::var_os("EPS_LOG_LEVEL").is_some()
        || std::env::args_os().any(|a| a == "--log-level" || a.to_string_lossy().starts_with("--log-level="))
}
