//! Stand-alone wrapper around `kthw_lab::lb` for the benchmark and the process tests,
//! until `kthw-lab lb run` lands in the main CLI.
//!
//! `kthw-lb --config FILE` runs the balancer in the foreground (SIGTERM/SIGINT stop it,
//! SIGHUP reloads the config); `kthw-lb status SOCKET [--json]` prints its status.

use std::path::PathBuf;
use std::process::ExitCode;

use kthw_lab::lb;

fn usage() -> ExitCode {
    eprintln!("usage: kthw-lb --config FILE | kthw-lb status SOCKET [--json]");
    ExitCode::from(2)
}

fn print_chain(e: &dyn std::error::Error) {
    eprintln!("error: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        eprintln!("  caused by: {s}");
        src = s.source();
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("status") {
        let Some(sock) = args.get(1) else {
            return usage();
        };
        return match lb::status(&PathBuf::from(sock)) {
            Ok(s) if args.iter().any(|a| a == "--json") => {
                println!("{}", serde_json::to_string_pretty(&s).expect("serializes"));
                ExitCode::SUCCESS
            }
            Ok(s) => {
                print!("{}", lb::render_table(&s));
                ExitCode::SUCCESS
            }
            Err(e) => {
                print_chain(&e);
                ExitCode::FAILURE
            }
        };
    }
    let config = match args.as_slice() {
        [flag, path] if flag == "--config" => PathBuf::from(path),
        [one] if one.starts_with("--config=") => PathBuf::from(&one["--config=".len()..]),
        _ => return usage(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Detached, stderr is the lab's lb.log: no colour codes in it.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = lb::run_blocking(&config);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_chain(&e);
            ExitCode::FAILURE
        }
    }
}
