//! `warden`: the nfv-warden agent and its operator commands (`cli/`, one file per command
//! family).
//!
//! Every failure ends in one line on stderr, `warden: <what failed>: <why>`, and a non-zero
//! exit status (2 for a usage error, 1 for everything else).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
