//! Where guest console lines go: the hypervisor's serial console as `(d<ID>) text`, or, in
//! host unit tests, a per-thread list the test can inspect.

/// The text printed for a guest line (after `(d<ID>) `): the line itself, unless it is not
/// UTF-8.
pub fn printed_text(line: &[u8]) -> &str {
    core::str::from_utf8(line).unwrap_or("<invalid UTF-8>")
}

/// Emits one complete guest console line.
pub fn guest_line(domain_id: u32, line: &[u8]) {
    let text = printed_text(line);
    #[cfg(target_os = "none")]
    crate::hv_println!("(d{domain_id}) {text}");
    #[cfg(any(test, fuzzing))]
    testing::LINES.with(|lines| lines.borrow_mut().push(format!("(d{domain_id}) {text}")));
    #[cfg(not(any(test, fuzzing, target_os = "none")))]
    let _ = (domain_id, text);
}

/// Emits one line of the hypervisor's own (`lamina: ...`), in host unit tests to the same list.
pub fn hv_line(line: core::fmt::Arguments<'_>) {
    #[cfg(target_os = "none")]
    crate::hv_println!("{line}");
    #[cfg(any(test, fuzzing))]
    testing::LINES.with(|lines| lines.borrow_mut().push(format!("{line}")));
    #[cfg(not(any(test, fuzzing, target_os = "none")))]
    let _ = line;
}

#[cfg(any(test, fuzzing))]
pub(crate) mod testing {
    use std::cell::RefCell;

    thread_local! {
        pub(crate) static LINES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    /// Takes the lines emitted so far on this thread.
    pub(crate) fn take_lines() -> Vec<String> {
        LINES.with(|lines| core::mem::take(&mut *lines.borrow_mut()))
    }
}
