//! Raw Btrfs kernel ABI: the argument structs and request numbers from the
//! kernel's `include/uapi/linux/btrfs.h`, plus thin wrappers that keep every
//! `unsafe` ioctl call of the module in this one file.
//!
//! Numbers are computed the way the C `_IOW`/`_IOR` macros do, so they stay
//! correct on architectures whose ioctl encoding differs from x86-64.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `BTRFS_IOCTL_MAGIC`: the ioctl "type" byte shared by all Btrfs requests.
pub const BTRFS_IOCTL_MAGIC: u32 = 0x94;
/// `BTRFS_PATH_NAME_MAX`: longest name `btrfs_ioctl_vol_args` can hold.
pub const BTRFS_PATH_NAME_MAX: usize = 4087;
/// `BTRFS_SUBVOL_NAME_MAX`: longest name `btrfs_ioctl_vol_args_v2` can hold.
pub const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
/// `BTRFS_SUBVOL_RDONLY`: subvolume flag for read-only snapshots.
pub const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;
/// `BTRFS_ROOT_SUBVOL_RDONLY`: the read-only bit of a root item's flags, as
/// `BTRFS_IOC_GET_SUBVOL_INFO` reports them (not the ioctl flag above).
pub const BTRFS_ROOT_SUBVOL_RDONLY: u64 = 1 << 0;
/// `BTRFS_SUPER_MAGIC` from `linux/magic.h`: `statfs.f_type` of Btrfs.
pub const BTRFS_SUPER_MAGIC: u32 = 0x9123_683E;
/// `BTRFS_FIRST_FREE_OBJECTID`: inode number of every subvolume's root dir.
pub const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

/// `struct btrfs_ioctl_vol_args`.
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct btrfs_ioctl_vol_args {
    pub fd: i64,
    pub name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args_v2`; `unused` overlays the kernel's
/// qgroup-inherit union, which we never use and so leave zeroed.
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct btrfs_ioctl_vol_args_v2 {
    pub fd: i64,
    pub transid: u64,
    pub flags: u64,
    pub unused: [u64; 4],
    pub name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_timespec`.
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct btrfs_ioctl_timespec {
    pub sec: u64,
    pub nsec: u32,
}

/// `struct btrfs_ioctl_get_subvol_info_args`: what the kernel tells about the
/// subvolume an fd lies in.
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct btrfs_ioctl_get_subvol_info_args {
    pub treeid: u64,
    pub name: [u8; 256],
    pub parent_id: u64,
    pub dirid: u64,
    pub generation: u64,
    pub flags: u64,
    pub uuid: [u8; 16],
    pub parent_uuid: [u8; 16],
    pub received_uuid: [u8; 16],
    pub ctransid: u64,
    pub otransid: u64,
    pub stransid: u64,
    pub rtransid: u64,
    pub ctime: btrfs_ioctl_timespec,
    pub otime: btrfs_ioctl_timespec,
    pub stime: btrfs_ioctl_timespec,
    pub rtime: btrfs_ioctl_timespec,
    pub reserved: [u64; 8],
}

const _: () = assert!(size_of::<btrfs_ioctl_vol_args>() == 4096);
const _: () = assert!(size_of::<btrfs_ioctl_get_subvol_info_args>() == 504);
const _: () = assert!(size_of::<btrfs_ioctl_vol_args_v2>() == 4096);

#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "mips32r6",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod ioc {
    pub const SIZEBITS: u32 = 13;
    pub const READ: u32 = 2;
    pub const WRITE: u32 = 4;
}

#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "mips32r6",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod ioc {
    pub const SIZEBITS: u32 = 14;
    pub const READ: u32 = 2;
    pub const WRITE: u32 = 1;
}

/// The kernel's `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    const NRSHIFT: u32 = 0;
    const TYPESHIFT: u32 = NRSHIFT + 8;
    const SIZESHIFT: u32 = TYPESHIFT + 8;
    const DIRSHIFT: u32 = SIZESHIFT + ioc::SIZEBITS;
    assert!(size < (1 << ioc::SIZEBITS));
    (dir << DIRSHIFT) | ((size as u32) << SIZESHIFT) | (ty << TYPESHIFT) | (nr << NRSHIFT)
}

/// The kernel's `_IOW(type, nr, T)`.
const fn iow<T>(ty: u32, nr: u32) -> u32 {
    ioc(ioc::WRITE, ty, nr, size_of::<T>())
}

/// The kernel's `_IOR(type, nr, T)`.
const fn ior<T>(ty: u32, nr: u32) -> u32 {
    ioc(ioc::READ, ty, nr, size_of::<T>())
}

/// `BTRFS_IOC_SUBVOL_CREATE`.
pub const BTRFS_IOC_SUBVOL_CREATE: u32 = iow::<btrfs_ioctl_vol_args>(BTRFS_IOCTL_MAGIC, 14);
/// `BTRFS_IOC_SNAP_DESTROY`.
pub const BTRFS_IOC_SNAP_DESTROY: u32 = iow::<btrfs_ioctl_vol_args>(BTRFS_IOCTL_MAGIC, 15);
/// `BTRFS_IOC_SNAP_CREATE_V2`.
pub const BTRFS_IOC_SNAP_CREATE_V2: u32 = iow::<btrfs_ioctl_vol_args_v2>(BTRFS_IOCTL_MAGIC, 23);
/// `BTRFS_IOC_SUBVOL_GETFLAGS`.
pub const BTRFS_IOC_SUBVOL_GETFLAGS: u32 = ior::<u64>(BTRFS_IOCTL_MAGIC, 25);
/// `BTRFS_IOC_SUBVOL_SETFLAGS`.
pub const BTRFS_IOC_SUBVOL_SETFLAGS: u32 = iow::<u64>(BTRFS_IOCTL_MAGIC, 26);
/// `BTRFS_IOC_GET_SUBVOL_INFO`.
pub const BTRFS_IOC_GET_SUBVOL_INFO: u32 =
    ior::<btrfs_ioctl_get_subvol_info_args>(BTRFS_IOCTL_MAGIC, 60);

impl btrfs_ioctl_vol_args {
    fn new(name: &[u8]) -> io::Result<Self> {
        let mut args = Self {
            fd: 0,
            name: [0; BTRFS_PATH_NAME_MAX + 1],
        };
        fill_name(&mut args.name, name)?;
        Ok(args)
    }
}

impl btrfs_ioctl_vol_args_v2 {
    fn new(name: &[u8]) -> io::Result<Self> {
        let mut args = Self {
            fd: 0,
            transid: 0,
            flags: 0,
            unused: [0; 4],
            name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
        };
        fill_name(&mut args.name, name)?;
        Ok(args)
    }
}

/// Copies `name` into a zeroed kernel buffer, keeping room for the NUL the
/// kernel relies on; callers validate names first, so failing here is a bug
/// guard rather than a user-facing check.
fn fill_name(buf: &mut [u8], name: &[u8]) -> io::Result<()> {
    if name.len() >= buf.len() || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "name does not fit the btrfs ioctl buffer",
        ));
    }
    buf[..name.len()].copy_from_slice(name);
    Ok(())
}

/// Issues one ioctl whose argument is a pointer to `arg`.
fn ioctl<T>(fd: impl AsFd, request: u32, arg: &mut T) -> io::Result<()> {
    // SAFETY: the fd is borrowed for the duration of the call and `arg`
    // points to a live value of the exact type the request number encodes.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), request as _, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates an empty subvolume `name` inside the directory `parent`.
pub fn subvol_create(parent: impl AsFd, name: &[u8]) -> io::Result<()> {
    let mut args = btrfs_ioctl_vol_args::new(name)?;
    ioctl(parent, BTRFS_IOC_SUBVOL_CREATE, &mut args)
}

/// Snapshots the subvolume open as `source` to `name` inside `parent`.
pub fn snap_create_v2(
    parent: impl AsFd,
    source: impl AsFd,
    name: &[u8],
    flags: u64,
) -> io::Result<()> {
    let mut args = btrfs_ioctl_vol_args_v2::new(name)?;
    args.fd = i64::from(source.as_fd().as_raw_fd());
    args.flags = flags;
    ioctl(parent, BTRFS_IOC_SNAP_CREATE_V2, &mut args)
}

/// Deletes the subvolume `name` inside the directory `parent`.
pub fn snap_destroy(parent: impl AsFd, name: &[u8]) -> io::Result<()> {
    let mut args = btrfs_ioctl_vol_args::new(name)?;
    ioctl(parent, BTRFS_IOC_SNAP_DESTROY, &mut args)
}

/// Reads the `BTRFS_SUBVOL_*` flags of the subvolume open as `subvol`.
pub fn subvol_getflags(subvol: impl AsFd) -> io::Result<u64> {
    let mut flags = 0u64;
    ioctl(subvol, BTRFS_IOC_SUBVOL_GETFLAGS, &mut flags)?;
    Ok(flags)
}

/// Replaces the `BTRFS_SUBVOL_*` flags of the subvolume open as `subvol`.
pub fn subvol_setflags(subvol: impl AsFd, flags: u64) -> io::Result<()> {
    let mut flags = flags;
    ioctl(subvol, BTRFS_IOC_SUBVOL_SETFLAGS, &mut flags)
}

/// Reads what the kernel tells about the subvolume `fd` lies in.
pub fn get_subvol_info(fd: impl AsFd) -> io::Result<btrfs_ioctl_get_subvol_info_args> {
    let zero = || btrfs_ioctl_timespec { sec: 0, nsec: 0 };
    let mut args = btrfs_ioctl_get_subvol_info_args {
        treeid: 0,
        name: [0; 256],
        parent_id: 0,
        dirid: 0,
        generation: 0,
        flags: 0,
        uuid: [0; 16],
        parent_uuid: [0; 16],
        received_uuid: [0; 16],
        ctransid: 0,
        otransid: 0,
        stransid: 0,
        rtransid: 0,
        ctime: zero(),
        otime: zero(),
        stime: zero(),
        rtime: zero(),
        reserved: [0; 8],
    };
    ioctl(fd, BTRFS_IOC_GET_SUBVOL_INFO, &mut args)?;
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by a C program built against `linux/btrfs.h` on
    /// x86-64; the generic `_IOC` layout makes them the same on aarch64.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn request_numbers_match_kernel_headers() {
        assert_eq!(BTRFS_IOC_SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(BTRFS_IOC_SNAP_DESTROY, 0x5000_940f);
        assert_eq!(BTRFS_IOC_SNAP_CREATE_V2, 0x5000_9417);
        assert_eq!(BTRFS_IOC_SUBVOL_GETFLAGS, 0x8008_9419);
        assert_eq!(BTRFS_IOC_SUBVOL_SETFLAGS, 0x4008_941a);
        assert_eq!(BTRFS_IOC_GET_SUBVOL_INFO, 0x81f8_943c);
    }

    #[test]
    fn fill_name_keeps_a_terminating_nul() {
        let mut buf = [0xffu8; 4];
        assert!(fill_name(&mut buf, b"abcd").is_err());
        assert!(fill_name(&mut buf, b"a\0b").is_err());
        let mut buf = [0u8; 4];
        fill_name(&mut buf, b"abc").unwrap();
        assert_eq!(&buf, b"abc\0");
    }
}
