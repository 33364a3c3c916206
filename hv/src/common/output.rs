//! Where guest console lines go: the hypervisor's serial console as `(d<ID>) text`, or, in
//! host unit tests, a per-thread list the test can inspect.

/// The text printed for a guest line (after `(d<ID>) `): the line itself, unless it is not
/// UTF-8.
pub fn printed_text(line: &[u8]) -> &str {
    core::str::from_utf8(line).unwrap_or("<invalid UTF-8>")
}

/// `(d<ID>) `, the prefix of domain `domain_id`'s lines, written into `buffer`.
pub fn line_prefix(domain_id: u32, buffer: &mut [u8; 16]) -> &[u8] {
    // The digits from the right, then "(d" before them: no formatting machinery per line.
    let mut at = buffer.len() - 2;
    buffer[at..].copy_from_slice(b") ");
    let mut id = domain_id;
    loop {
        at -= 1;
        buffer[at] = b'0' + (id % 10) as u8;
        id /= 10;
        if id == 0 {
            break;
        }
    }
    at -= 2;
    buffer[at..at + 2].copy_from_slice(b"(d");
    &buffer[at..]
}

/// Emits one complete guest console line, `text` (see [`printed_text`]): copied to the
/// serial console's ring as three runs under one lock, never byte by byte.
pub fn guest_line(domain_id: u32, text: &str) {
    #[cfg(target_os = "none")]
    {
        let mut prefix = [0u8; 16];
        let prefix = line_prefix(domain_id, &mut prefix);
        crate::platform::serial::SERIAL
            .lock()
            .write_runs(&[prefix, text.as_bytes(), b"\n"]);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_prefixes_are_the_domain_id_in_decimal() {
        let mut buffer = [0u8; 16];
        assert_eq!(line_prefix(1, &mut buffer), b"(d1) ");
        assert_eq!(line_prefix(0, &mut buffer), b"(d0) ");
        assert_eq!(line_prefix(10, &mut buffer), b"(d10) ");
        assert_eq!(line_prefix(u32::MAX, &mut buffer), b"(d4294967295) ");
    }
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
