//! soci-agent entry point: parse, set up logging, run, print the report,
//! exit with a code that means something (see `soci_agent::exit`).

use std::process::ExitCode;

use soci_agent::cli::{Cli, Command};
use soci_agent::output::OutputFormat;

fn main() -> ExitCode {
    let cli = Cli::parse_with_sources();
    if let Err(e) = soci_agent::logging::init(&cli.log_level) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = cli.command.check_root() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soci-agent: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Install(args) => print_report(runtime.block_on(soci_agent::install::run(&args))),
        Command::Uninstall(args) => print_report(runtime.block_on(soci_agent::uninstall::run(&args))),
        Command::Daemon(args) => ExitCode::from(runtime.block_on(soci_agent::daemon::run(&args))),
        Command::Doctor(args) => ExitCode::from(runtime.block_on(soci_agent::doctor::run(&args))),
        Command::Cache(args) => ExitCode::from(runtime.block_on(soci_agent::cache::run(&args))),
        Command::Prefetch(args) => ExitCode::from(runtime.block_on(soci_agent::prefetch::run(&args))),
        Command::Render(args) => {
            let (text, code) = soci_agent::render::run(&args);
            print!("{text}");
            ExitCode::from(code)
        }
        Command::Boot(args) => {
            let (report, output) = runtime.block_on(soci_agent::boot::run(&args));
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report).expect("report serializes")),
                OutputFormat::Text => print!("{}", report.to_text()),
            }
            ExitCode::from(report.exit_code)
        }
    }
}

fn print_report((report, output): (soci_agent::install::report::InstallReport, OutputFormat)) -> ExitCode {
    match output {
        OutputFormat::Json => println!("{}", report.to_json()),
        OutputFormat::Text => print!("{}", report.to_text()),
    }
    ExitCode::from(report.exit_code)
}
