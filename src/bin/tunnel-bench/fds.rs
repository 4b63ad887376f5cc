//! What `tunnel-bench signal` needs to hold 100 000 connections on one machine: a higher
//! file-descriptor limit (for itself and the server it spawns, which inherits it), and client
//! sockets spread over several loopback source addresses (127.0.0.x), since one source
//! address only has the ephemeral port range (`net.ipv4.ip_local_port_range`) to connect
//! from. Called by `signal`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};

/// How far the file-descriptor limit could be raised.
pub struct FdLimit {
    /// The limit now (soft and hard, when raising worked).
    pub limit: u64,
    /// Why it is below what was asked, if it is.
    pub short: Option<String>,
}

/// Raises `RLIMIT_NOFILE` (soft and hard) to `want`, bounded by `fs.nr_open`; raising the
/// hard limit needs root (CAP_SYS_RESOURCE). Without it the soft limit goes up to the hard one.
pub fn raise_nofile(want: u64) -> FdLimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit that outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return FdLimit {
            limit: 1024,
            short: Some(format!(
                "cannot read RLIMIT_NOFILE: {}",
                io::Error::last_os_error()
            )),
        };
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = want.min(nr_open);
    if lim.rlim_cur >= target {
        return FdLimit {
            limit: lim.rlim_cur,
            short: None,
        };
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: target.max(lim.rlim_max),
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        let short = (target < want).then(|| format!("fs.nr_open is {nr_open}"));
        return FdLimit {
            limit: target,
            short,
        };
    }
    let why = io::Error::last_os_error();
    let soft = libc::rlimit {
        rlim_cur: lim.rlim_max.min(target),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above; the soft limit stays within the hard one.
    let limit = if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
        soft.rlim_cur
    } else {
        lim.rlim_cur
    };
    let short = (limit < target).then(|| {
        format!(
            "cannot raise the hard limit from {} to {target} ({why}; raising it needs CAP_SYS_RESOURCE, which root may lack in a container)",
            lim.rlim_max
        )
    });
    FdLimit { limit, short }
}

/// Ports one source address can connect from: the size of `net.ipv4.ip_local_port_range`.
pub fn ephemeral_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next()) {
                (Some(Ok(lo)), Some(Ok(hi))) if hi >= lo => Some(hi - lo + 1),
                _ => None,
            }
        })
        .unwrap_or(28_232)
}

/// A blocking TCP connection to `to` from `from` (port chosen by the kernel at connect time:
/// `IP_BIND_ADDRESS_NO_PORT`, so the port is only taken for this one 4-tuple and other
/// programs connecting elsewhere still have the whole range).
pub fn connect_from(from: Ipv4Addr, to: SocketAddrV4) -> io::Result<TcpStream> {
    // SAFETY: plain syscall; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: a valid descriptor and a pointer to a c_int that outlives the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let local = sockaddr_in(SocketAddrV4::new(from, 0));
    // SAFETY: a valid descriptor and a sockaddr_in with its size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let remote = sockaddr_in(to);
    // SAFETY: as above.
    let rc = unsafe {
        libc::connect(
            fd,
            (&remote as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpStream::from(owned))
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The IPv4 address and port of `addr`, which the bench's server listens on.
pub fn v4(addr: SocketAddr) -> Result<SocketAddrV4, String> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => Err(format!("the server listens on {a}, not IPv4 loopback")),
    }
}
