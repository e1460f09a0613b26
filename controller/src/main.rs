//! `unistor`: flags in, [`controller::run`] out. Exit codes: 0 success, 1 error, refusal or bad
//! usage, 2 changes pending (`plan`; never a usage error: a misspelt flag must not read as drift).

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match agent_kit::cli::parse::<controller::Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    agent_kit::cli::init_tracing("warn");
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(controller::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("unistor: {}", protocol::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}
