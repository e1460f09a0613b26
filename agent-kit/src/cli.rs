//! Command lines: clap's parse, with unistor's exit codes. A usage error (an unknown or
//! misspelt flag, a bad value) exits 1 like any other failure, never clap's 2: `unistor plan`
//! exits 2 for "changes pending", and a pipeline must not read a typo as drift. `--help` and `--version`
//! print and exit 0.

use std::process::ExitCode;

/// The exit code of a usage error.
pub const USAGE: u8 = 1;

/// Parses the process's arguments into `T`; on a usage error (or `--help`), prints what clap
/// says and returns the exit code to end with.
pub fn parse<T: clap::Parser>() -> Result<T, ExitCode> {
    parse_from(std::env::args_os())
}

/// [`parse`] over `args` (the program name first).
pub fn parse_from<T, I, A>(args: I) -> Result<T, ExitCode>
where
    T: clap::Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    T::try_parse_from(args).map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// Logs to stderr at `RUST_LOG`'s levels, or `default` (`info`, `warn`) when it is not set: the
/// same for every program of the project. With `UNISTOR_SPAN_TIMES` set (to anything), each span
/// also logs a line when it closes, with the time it was busy and idle: where a reconcile, a step
/// or a session spent its time.
pub fn init_tracing(default: &str) {
    use tracing_subscriber::fmt::format::FmtSpan;
    let spans = if std::env::var_os("UNISTOR_SPAN_TIMES").is_some() {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_span_events(spans)
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Args {
        #[arg(long)]
        pki_dir: Option<String>,
    }

    #[test]
    fn a_usage_error_is_1_and_help_is_0() {
        assert!(parse_from::<Args, _, _>(["x", "--pki-dir", "p"]).is_ok());
        let typo = parse_from::<Args, _, _>(["x", "--pki-dirr", "p"]).unwrap_err();
        assert_eq!(format!("{typo:?}"), format!("{:?}", ExitCode::from(1)));
        let help = parse_from::<Args, _, _>(["x", "--help"]).unwrap_err();
        assert_eq!(format!("{help:?}"), format!("{:?}", ExitCode::SUCCESS));
    }
}
