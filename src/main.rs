//! The `illmrec` command line.

mod cli;
mod server;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Output into a closed pipe (`illmrec bank inspect F | head -1`) ends the process quietly,
    // as for any Unix filter, instead of a panic in println!.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
