//! `vhost-user-net`: see the library documentation and `vhost-user-net --help`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    backends::vhost_user::init_logging();
    let args = match vhost_user_net::Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vhost-user-net: {}", backends::vhost_user::one_line(&e));
            return ExitCode::from(2);
        }
    };
    match vhost_user_net::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-net: {e}");
            ExitCode::from(2)
        }
    }
}
