//! TCP ports for the servers tests start, reserved so that no two tests — in this process or in
//! any other test process on the machine — are handed the same one.
//!
//! "Bind port 0, read the port, close" is racy twice over: the kernel may hand the same port to
//! another process's bind-to-0 or to an outgoing connection (both draw from the ephemeral range)
//! before our server binds it. So ports come from *below* the ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`), which the kernel never hands out by itself, and
//! each is reserved by an exclusive lock on `<tmp>/prebuilds-test-ports/<port>.lock`, held until
//! the test process exits (the lock goes with the process, so a crashed test leaves nothing
//! behind). A candidate another process holds, or that something else is listening on, is
//! skipped.

use std::{
    fs::{File, OpenOptions},
    net::TcpListener,
    path::PathBuf,
    sync::Mutex,
};

/// Reservation files this process holds (their locks are released when it exits).
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// The lowest port handed out: above the well-known and common registered service ports.
const LOWEST: u16 = 20_000;

fn first_ephemeral() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|&low: &u16| low > LOWEST + 1_000)
        .unwrap_or(32_768)
}

fn directory() -> PathBuf {
    let dir = std::env::temp_dir().join("prebuilds-test-ports");
    std::fs::create_dir_all(&dir).expect("create the port reservation directory");
    dir
}

/// A loopback TCP port no other test holds and nothing listens on, reserved for the rest of this
/// process's life.
// `File::try_lock` is newer than the workspace's declared minimum Rust; the tests only ever run
// on the development toolchain.
#[allow(clippy::incompatible_msrv)]
pub fn reserve() -> u16 {
    let (dir, high) = (directory(), first_ephemeral());
    let span = u32::from(high - LOWEST);
    for _ in 0..10_000 {
        let offset = uuid::Uuid::new_v4().as_u128() as u32 % span;
        let port = LOWEST + offset as u16;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{port}.lock")))
            .expect("open a port reservation file");
        if file.try_lock().is_err() {
            continue; // another test holds it (or this process does, through an earlier call)
        }
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue; // something outside the tests listens there
        }
        HELD.lock().expect("not poisoned").push(file);
        return port;
    }
    panic!("no free port between {LOWEST} and {high} after 10000 tries");
}

#[cfg(test)]
mod tests {
    use super::*;

    // See `reserve` on the MSRV allowance.
    #[allow(clippy::incompatible_msrv)]
    #[test]
    fn a_reserved_port_is_below_the_ephemeral_range_and_nobody_else_can_reserve_it() {
        let ports: Vec<u16> = (0..20).map(|_| reserve()).collect();
        let high = first_ephemeral();
        for &port in &ports {
            assert!(
                (LOWEST..high).contains(&port),
                "{port} outside {LOWEST}..{high}"
            );
            // Another process's reservation opens the same file: its lock must be refused while
            // this process lives (flock conflicts between separate opens, also within a process).
            let other = OpenOptions::new()
                .write(true)
                .open(directory().join(format!("{port}.lock")))
                .unwrap();
            assert!(
                other.try_lock().is_err(),
                "port {port} could be reserved twice"
            );
        }
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    }
}
