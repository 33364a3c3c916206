//! Start-of-day information, at [`crate::layout::START_INFO_GPA`] when the kernel starts.

/// Value of [`StartInfo::magic`]: ASCII "LMNA" read as a little-endian `u32`.
pub const START_INFO_MAGIC: u32 = u32::from_le_bytes(*b"LMNA");

/// [`StartInfo::flags`]: the domain is privileged (may control other domains).
pub const START_FLAG_PRIVILEGED: u32 = 1 << 0;

/// What a kernel knows at its first instruction. All addresses are guest-physical.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StartInfo {
    /// [`START_INFO_MAGIC`].
    pub magic: u32,
    /// ABI version, `major << 16 | minor`.
    pub abi_version: u32,
    /// This domain's identifier (1, 2, ... in boot-module order).
    pub domain_id: u32,
    /// `START_FLAG_*` bits.
    pub flags: u32,
    /// Size of RAM: guest-physical `[0, mem_bytes)`.
    pub mem_bytes: u64,
    /// Lowest address of the loaded kernel image.
    pub image_start: u64,
    /// First page-aligned address above the kernel image: free RAM starts here.
    pub image_end: u64,
    /// Initial stack top (RSP at entry); the stack is the `STACK_BYTES` below it.
    pub stack_top: u64,
    /// Address of the NUL-terminated command line.
    pub cmdline_gpa: u64,
    /// Length of the command line, without the NUL.
    pub cmdline_len: u64,
    /// Number of vCPUs of this domain.
    pub nr_vcpus: u32,
    /// Event-channel port of the console ring: send on it to have the ring drained at once.
    pub console_port: u32,
    /// The domain's name, NUL-padded.
    pub name: [u8; 32],
    /// Address of the shared-info page.
    pub shared_info_gpa: u64,
    /// Address of the console ring page.
    pub console_ring_gpa: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
}

const _: () = assert!(core::mem::size_of::<StartInfo>() == 128);
const _: () = assert!(core::mem::offset_of!(StartInfo, mem_bytes) == 16);
const _: () = assert!(core::mem::offset_of!(StartInfo, nr_vcpus) == 64);
const _: () = assert!(core::mem::offset_of!(StartInfo, name) == 72);
const _: () = assert!(core::mem::offset_of!(StartInfo, shared_info_gpa) == 104);

impl StartInfo {
    /// The domain's name as text (up to the first NUL; invalid UTF-8 yields `"?"`).
    pub fn name(&self) -> &str {
        crate::nul_padded_str(&self.name)
    }
}
