//! qmp: one QMP command to a QEMU, for lab scripts (the bench pauses QEMU with `stop` /
//! `cont` as it pauses our vmm with `vm.pause` / `vm.resume`, and hot-adds devices with
//! `device_add` as it does ours with `vm.add-device`).
//!
//! ```text
//! qmp SOCKET COMMAND [ARGUMENTS-JSON]
//! ```
//!
//! Connects to QEMU's QMP unix socket (`-qmp unix:SOCKET,server=on,wait=off`), reads the
//! greeting, negotiates (`qmp_capabilities`), sends `{"execute": COMMAND, "arguments":
//! ARGUMENTS}` and prints the `return` value as JSON (events on the way are skipped); exits 1
//! with QEMU's error (`qmp: <class>: <desc>`) or 2 when QEMU does not answer within 10 s.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, command, arguments) = match args.as_slice() {
        [s, c] => (s, c, None),
        [s, c, a] => match serde_json::from_str::<Value>(a) {
            Ok(v) => (s, c, Some(v)),
            Err(e) => {
                eprintln!("qmp: ARGUMENTS is not JSON: {e}");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: qmp SOCKET COMMAND [ARGUMENTS-JSON]");
            return ExitCode::from(2);
        }
    };
    match run(socket, command, arguments) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err((code, why)) => {
            eprintln!("qmp: {why}");
            ExitCode::from(code)
        }
    }
}

fn run(socket: &str, command: &str, arguments: Option<Value>) -> Result<Value, (u8, String)> {
    let start = Instant::now();
    let s = UnixStream::connect(socket).map_err(|e| (2, format!("{socket}: {e}")))?;
    let mut w = s.try_clone().map_err(|e| (2, e.to_string()))?;
    let mut r = BufReader::new(s);
    let next = |r: &mut BufReader<UnixStream>| -> Result<Value, (u8, String)> {
        loop {
            let left = DEADLINE
                .checked_sub(start.elapsed())
                .filter(|d| !d.is_zero())
                .ok_or((
                    2,
                    format!("no answer from QEMU within {} s", DEADLINE.as_secs()),
                ))?;
            r.get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| (2, e.to_string()))?;
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return Err((2, "QEMU closed the connection".into())),
                Ok(_) => {}
                Err(e) => return Err((2, format!("reading from QEMU: {e}"))),
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| (2, format!("QEMU sent no JSON ({e}): {}", line.trim())))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    let greeting = next(&mut r)?;
    if greeting.get("QMP").is_none() {
        return Err((2, format!("not a QMP greeting: {greeting}")));
    }
    let mut send = |v: Value| writeln!(w, "{v}").map_err(|e| (2, format!("writing to QEMU: {e}")));
    send(json!({ "execute": "qmp_capabilities" }))?;
    next(&mut r)?;
    let mut cmd = json!({ "execute": command });
    if let Some(a) = arguments {
        cmd["arguments"] = a;
    }
    send(cmd)?;
    let answer = next(&mut r)?;
    if let Some(e) = answer.get("error") {
        return Err((
            1,
            format!(
                "{}: {}",
                e["class"].as_str().unwrap_or("Error"),
                e["desc"].as_str().unwrap_or("")
            ),
        ));
    }
    Ok(answer.get("return").cloned().unwrap_or(Value::Null))
}
