use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = vmm::Cli::parse();
    match vmm::run(&cli) {
        Ok(why) => {
            match &why {
                vmm::VmExit::PowerOff => log::info!("guest powered off"),
                vmm::VmExit::Reboot => {
                    log::info!("guest requested a reboot; the vmm does not reboot guests, exiting")
                }
                vmm::VmExit::DebugExit(v) => {
                    log::info!("guest wrote {v:#x} to the debug-exit port")
                }
                vmm::VmExit::Crash {
                    vcpu,
                    reason,
                    state,
                } => {
                    eprintln!("vmm: guest crashed: vcpu {vcpu}: {reason}");
                    eprintln!("vmm: vcpu {vcpu} at the crash: {state}");
                }
                vmm::VmExit::VmmError(e) => eprintln!("vmm: {e}"),
                vmm::VmExit::Signal(s) => log::info!("stopped by signal {s}"),
                vmm::VmExit::ApiShutdown => log::info!("stopped through the API (vm.shutdown)"),
            }
            std::process::exit(why.code());
        }
        Err(e) => {
            eprintln!("vmm: {}", vmm::error_line(&e));
            std::process::exit(vmm::exit::EXIT_USAGE);
        }
    }
}
