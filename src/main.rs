//! The `illmrec` command line: parses the arguments ([`cli`]), runs the command, and prints its
//! error. The kiosk server ([`server`]) is started by `illmrec serve`.

#![deny(unsafe_code)]

mod cli;
mod server;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Output into a closed pipe (`illmrec bank inspect F | head -1`) ends the process quietly,
    // as for any Unix filter, instead of a panic in println!.
    #[cfg(unix)]
    #[allow(unsafe_code)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::messages::error(&e);
            ExitCode::FAILURE
        }
    }
}
