//! Non-blocking socket helpers shared by the mio drivers (`signal::server`, `tunnel`, `peer`):
//! accept a connection, read once into a buffer, write a buffer until the socket would block,
//! size kernel buffers.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use mio::net::{TcpListener, TcpStream};

/// Accepts one waiting connection, with TCP_NODELAY set; `None` once none is waiting (or on an
/// error, which is logged).
pub fn accept(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept() {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer))
        }
        Err(e) if would_block(&e) => None,
        Err(e) => {
            log::warn!("accept failed: {e}");
            None
        }
    }
}

/// Whether an I/O error only means "not now" on a non-blocking socket.
pub fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Writes `out` to `stream` until done or WouldBlock; the written prefix is removed. An emptied
/// buffer whose capacity grew past `keep` bytes is shrunk back to `keep`.
pub fn write_out<W: Write>(stream: &mut W, out: &mut Vec<u8>, keep: usize) -> io::Result<()> {
    let mut written = 0;
    let result = loop {
        if written == out.len() {
            break Ok(());
        }
        match stream.write(&out[written..]) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if would_block(&e) => break Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    out.drain(..written);
    if out.is_empty() && out.capacity() > keep {
        out.shrink_to(keep);
    }
    result
}

/// Reads once into `buf`'s spare room (up to `max` new bytes): Ok(0) is EOF.
pub fn read_some<R: Read>(stream: &mut R, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + max, 0);
    let result = loop {
        match stream.read(&mut buf[start..]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    buf.truncate(start + *result.as_ref().unwrap_or(&0));
    result
}

/// Sets the kernel's `SO_RCVBUF` or `SO_SNDBUF` (`option`) of `socket` to `bytes`.
pub fn set_buffer_size(socket: &impl AsRawFd, option: libc::c_int, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid descriptor, and a pointer to a c_int that outlives the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes closing `socket` abortive (`SO_LINGER` on, 0 s): the kernel drops what is still unsent
/// and sends RST, instead of holding the connection until a peer that stopped reading reads.
pub fn set_linger_zero(socket: &impl AsRawFd) -> io::Result<()> {
    let value = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid descriptor, and a pointer to a linger that outlives the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&value as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
