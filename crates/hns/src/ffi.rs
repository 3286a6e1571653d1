//! The C ABI of the HCN API, reached through libloading so the same code path
//! runs against computenetwork.dll on Windows and against a test library
//! (PROXYCTL_HNS_LIBRARY) anywhere.
//!
//! Signatures are those of computenetwork.h as hcsshim's `hcn` package calls
//! them (zsyscall_windows.go): GUIDs by pointer, UTF-16 NUL-terminated JSON,
//! `HRESULT` returns, and out-strings (`Properties`, `ErrorRecord`, HNSCall's
//! response) that the caller must release with `CoTaskMemFree`.
//!
//! The only Windows-specific part is where the three symbol groups live by
//! default: Hcn* in computenetwork.dll, the HNS v1 `HNSCall` (used for the
//! version query, as hcsshim's `GetGlobals` does) in vmcompute.dll, and
//! `CoTaskMemFree` in ole32.dll. With PROXYCTL_HNS_LIBRARY set, all of them
//! come from that one library (the fake exports `CoTaskMemFree` too).

use std::ffi::c_void;
use std::fmt;
use std::str::FromStr;

/// `HRESULT`: negative means failure.
pub type HResult = i32;
/// `PWSTR`: an out-string allocated by the callee.
pub type PWStr = *mut u16;
/// `HCN_ENDPOINT`, `HCN_NAMESPACE`: opaque handles.
pub type Handle = *mut c_void;

pub type OpenFn = unsafe extern "system" fn(*const Guid, *mut Handle, *mut PWStr) -> HResult;
pub type CloseFn = unsafe extern "system" fn(Handle) -> HResult;
pub type ModifyFn = unsafe extern "system" fn(Handle, *const u16, *mut PWStr) -> HResult;
pub type QueryFn = unsafe extern "system" fn(Handle, *const u16, *mut PWStr, *mut PWStr) -> HResult;
pub type EnumerateFn = unsafe extern "system" fn(*const u16, *mut PWStr, *mut PWStr) -> HResult;
pub type HnsCallFn =
    unsafe extern "system" fn(*const u16, *const u16, *const u16, *mut PWStr) -> HResult;
pub type FreeFn = unsafe extern "system" fn(*mut c_void);

/// Environment variable naming one library that exports the whole API.
pub const LIBRARY_ENV: &str = "PROXYCTL_HNS_LIBRARY";

/// Where each group of symbols is loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryNames {
    pub hcn: String,
    pub hns_call: String,
    pub co_task_mem_free: String,
}

impl LibraryNames {
    /// All symbols from one library (a test library, or a shim).
    pub fn single(path: impl Into<String>) -> Self {
        let path = path.into();
        Self {
            hcn: path.clone(),
            hns_call: path.clone(),
            co_task_mem_free: path,
        }
    }

    /// PROXYCTL_HNS_LIBRARY if set, else the system DLLs on Windows, else none.
    pub fn from_env() -> Option<Self> {
        if let Some(path) = std::env::var_os(LIBRARY_ENV).filter(|p| !p.is_empty()) {
            return Some(Self::single(path.to_string_lossy().into_owned()));
        }
        Self::platform_default()
    }

    #[cfg(windows)]
    pub fn platform_default() -> Option<Self> {
        Some(Self {
            hcn: "computenetwork.dll".into(),
            hns_call: "vmcompute.dll".into(),
            co_task_mem_free: "ole32.dll".into(),
        })
    }

    #[cfg(not(windows))]
    pub fn platform_default() -> Option<Self> {
        None
    }
}

/// A Windows `GUID` as passed to HcnOpenEndpoint / HcnOpenNamespace.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid {
    pub data1: u32,
    pub data2: u16,
    pub data3: u16,
    pub data4: [u8; 8],
}

impl FromStr for Guid {
    type Err = ();

    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, any case, optionally in braces.
    fn from_str(s: &str) -> Result<Self, ()> {
        let s = s.trim();
        let s = s
            .strip_prefix('{')
            .and_then(|x| x.strip_suffix('}'))
            .unwrap_or(s);
        let groups: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if groups.len() != 5
            || groups
                .iter()
                .zip(lens)
                .any(|(g, n)| g.len() != n || !g.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(());
        }
        let hex = |t: &str| u64::from_str_radix(t, 16).map_err(|_| ());
        let tail = format!("{}{}", groups[3], groups[4]);
        let mut data4 = [0u8; 8];
        for (i, byte) in data4.iter_mut().enumerate() {
            *byte = hex(&tail[i * 2..i * 2 + 2])? as u8;
        }
        Ok(Self {
            data1: hex(groups[0])? as u32,
            data2: hex(groups[1])? as u16,
            data3: hex(groups[2])? as u16,
            data4,
        })
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1, self.data2, self.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}

/// `s` as a NUL-terminated UTF-16 string; `None` if it holds a NUL itself.
pub fn wide(s: &str) -> Option<Vec<u16>> {
    if s.contains('\0') {
        return None;
    }
    Some(s.encode_utf16().chain(std::iter::once(0)).collect())
}

/// Longest out-string read (in UTF-16 units): a guard against a missing NUL.
const MAX_OUT_STRING: usize = 64 << 20;

/// An out-string owned by us until dropped, when it is released with
/// `CoTaskMemFree` as the API requires — on every path, errors included.
pub struct OutString {
    ptr: PWStr,
    free: FreeFn,
}

impl OutString {
    /// # Safety
    /// `ptr` is null or a NUL-terminated UTF-16 string the API allocated
    /// for us to free with `free`.
    pub unsafe fn new(ptr: PWStr, free: FreeFn) -> Self {
        Self { ptr, free }
    }

    pub fn is_null(&self) -> bool {
        self.ptr.is_null()
    }

    /// The text; `Err` with a description if it is not valid UTF-16.
    pub fn text(&self) -> Result<String, String> {
        if self.ptr.is_null() {
            return Ok(String::new());
        }
        let mut len = 0usize;
        // SAFETY: the API hands us a NUL-terminated string (see `new`); the
        // scan stops at the NUL or at the guard length.
        unsafe {
            while *self.ptr.add(len) != 0 {
                len += 1;
                if len >= MAX_OUT_STRING {
                    return Err("string without a terminating NUL".into());
                }
            }
            let units = std::slice::from_raw_parts(self.ptr, len);
            String::from_utf16(units).map_err(|e| format!("invalid UTF-16: {e}"))
        }
    }
}

impl Drop for OutString {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the pointer came from the API and is freed once.
            unsafe { (self.free)(self.ptr.cast()) };
            self.ptr = std::ptr::null_mut();
        }
    }
}
