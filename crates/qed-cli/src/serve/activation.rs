//! systemd socket activation: a service manager that bound the socket passes it as
//! descriptor 3 with `LISTEN_PID` (this process) and `LISTEN_FDS` (how many) set, and the
//! server serves that socket instead of binding its own, as qemu-nbd does.

use qed_nbd::server::Listener;

use crate::error::{CliError, CliResult};

/// How many sockets the environment passes to this process: `LISTEN_FDS`, counted only when
/// `LISTEN_PID` names this process (a variable inherited from a parent is not meant for us).
pub fn passed_sockets() -> CliResult<usize> {
    let Some(pid) = std::env::var_os("LISTEN_PID") else {
        return Ok(0);
    };
    if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(0);
    }
    let Some(count) = std::env::var_os("LISTEN_FDS") else {
        return Ok(0);
    };
    count
        .to_str()
        .and_then(|c| c.parse::<usize>().ok())
        .ok_or_else(|| {
            CliError::plain(format!(
                "Unexpected value for LISTEN_FDS: {}",
                count.to_string_lossy()
            ))
        })
}

/// What the command line may not set when a socket is passed, with qemu-nbd's words.
pub fn validate(socket: bool, bind: bool, port: bool) -> CliResult<()> {
    let problem = if socket {
        "Unix socket can't be set when using socket activation"
    } else if bind {
        "The interface can't be set when using socket activation"
    } else if port {
        "TCP port number can't be set when using socket activation"
    } else {
        return Ok(());
    };
    Err(CliError::plain(problem))
}

/// Takes the one passed socket: a listening TCP or Unix stream socket.
pub fn take_listener() -> CliResult<Listener> {
    let mut fds = listenfd::ListenFd::from_env();
    let taken = match fds.take_tcp_listener(0) {
        Ok(Some(tcp)) => Listener::from_tcp(tcp),
        Ok(None) => return Err(CliError::plain("no socket passed in LISTEN_FDS")),
        Err(_) => match fds.take_unix_listener(0) {
            Ok(Some(unix)) => Listener::from_unix(unix),
            Ok(None) => return Err(CliError::plain("no socket passed in LISTEN_FDS")),
            Err(e) => {
                return Err(CliError::new(
                    "the socket passed in LISTEN_FDS",
                    crate::error::os_text(&e),
                ))
            }
        },
    };
    taken.map_err(|e| CliError::new("the passed socket", crate::error::os_text(&e)))
}
