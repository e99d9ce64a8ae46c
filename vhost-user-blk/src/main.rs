//! `vhost-user-blk`: see the library documentation and `vhost-user-blk --help`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    backends::vhost_user::init_logging();
    let args = match vhost_user_blk::Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vhost-user-blk: {}", backends::vhost_user::one_line(&e));
            return ExitCode::from(2);
        }
    };
    match vhost_user_blk::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-blk: {e}");
            ExitCode::from(2)
        }
    }
}
