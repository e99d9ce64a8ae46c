//! COM1: a 16550A from vm-superio, its interrupt delivered through an irqfd on IRQ 4.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the serial IRQ by writing the irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOut = Box<dyn Write + Send>;

pub struct SerialDevice {
    serial: Serial<IrqFdTrigger, NoEvents, SerialOut>,
    logged_error: bool,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        SerialDevice {
            serial: Serial::new(IrqFdTrigger(irq), out),
            logged_error: false,
        }
    }

    /// Queues input bytes for the guest; returns how many were taken (the FIFO may be full).
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(SerialError::FullFifo) => 0,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.serial.write(offset as u8, b) {
                // A closed stdout must not take the VM down; say it once.
                if !self.logged_error {
                    log::warn!("serial: output failed, further errors not logged: {e:?}");
                    self.logged_error = true;
                }
            }
        }
    }
}

/// The stdin reader: reads fd 0, queues the bytes into the serial device (whose interrupt
/// is an eventfd write), waits while the guest's FIFO is full.
pub const SERIAL_IN: backends::sandbox::ThreadKind = backends::sandbox::ThreadKind {
    name: "serial-in",
    syscalls: &[
        &[
            backends::sandbox::allow(libc::SYS_read),
            backends::sandbox::allow(libc::SYS_write),
        ],
        crate::sandbox::COMMON_SYSCALLS,
    ],
};

/// Feeds the VMM's stdin to the guest's COM1 until EOF.
pub fn spawn_stdin_reader(serial: Arc<Mutex<SerialDevice>>) -> io::Result<()> {
    crate::sandbox::spawn(
        thread::Builder::new().name("serial-in".into()),
        SERIAL_IN,
        move || {
            let mut stdin = io::stdin().lock();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                let mut done = 0;
                while done < n {
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue(&buf[done..n]);
                    done += taken;
                    if taken == 0 {
                        // The guest has not drained its FIFO yet.
                        thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        },
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // Enable the received-data interrupt, then queue input: the irqfd fires.
        s.write(1, &[0x01]);
        assert_eq!(s.enqueue(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut d = [0u8];
        s.read(0, &mut d);
        assert_eq!(d[0], b'x');
    }
}
