//! Integer socket options that neither std, tokio nor socket2 set.

use std::{io, os::fd::AsRawFd};

/// `setsockopt(level, name, value)` with an `int` value.
pub fn set_int(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt with a valid descriptor and an int option value of
    // the size we pass.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
