//! `vhost-user-blk`: see the library documentation and `vhost-user-blk --help`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    vhost_user_blk::server::init_logging();
    let args = match vhost_user_blk::Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
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
