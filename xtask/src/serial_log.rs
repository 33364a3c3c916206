//! Reading the hypervisor's COM1 output, as specified in docs/hv-output-protocol.md.
//!
//! Only lines starting with `lamina: ` and guest lines `(d<ID>) ...` carry meaning; everything
//! else (firmware noise, `[hv]` log lines) is kept for humans but not interpreted.

/// The `lamina: result:` verdict of the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HvResult {
    Success,
    Failure,
}

impl HvResult {
    pub fn word(self) -> &'static str {
        match self {
            HvResult::Success => "success",
            HvResult::Failure => "failure",
        }
    }
}

/// The verdict carried by one line, if it is a result line.
pub fn result_of_line(line: &str) -> Option<HvResult> {
    match line.trim_end().strip_prefix("lamina: result: ")? {
        "success" => Some(HvResult::Success),
        "failure" => Some(HvResult::Failure),
        _ => None,
    }
}

/// Splits serial output into lines: `\r` dropped, a last line without `\n` kept (the emulator
/// may have died mid-line), invalid UTF-8 replaced.
pub fn split_lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split('\n')
        .map(|line| line.trim_end_matches('\r').to_string())
        .filter(|line| !line.is_empty())
        .collect()
}

/// A rule about one line of output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinePattern {
    /// Some line contains this text.
    Contains(&'static str),
    /// Some line starts with `prefix` and contains `needle` after it.
    StartsWithContaining {
        prefix: &'static str,
        needle: &'static str,
    },
}

impl LinePattern {
    pub fn matches(self, line: &str) -> bool {
        match self {
            LinePattern::Contains(text) => line.contains(text),
            LinePattern::StartsWithContaining { prefix, needle } => line
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.contains(needle)),
        }
    }

    /// How the rule reads in a report.
    pub fn describe(self) -> String {
        match self {
            LinePattern::Contains(text) => format!("a line containing {text:?}"),
            LinePattern::StartsWithContaining { prefix, needle } => {
                format!("a line starting with {prefix:?} containing {needle:?}")
            }
        }
    }
}

/// One `lamina: domain <ID> <NAME> <rest>` line, taken apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DomainLine<'a> {
    id: u32,
    name: &'a str,
    rest: &'a str,
}

fn domain_line(line: &str) -> Option<DomainLine<'_>> {
    let after = line.strip_prefix("lamina: domain ")?;
    let (id, after) = after.split_once(' ')?;
    let (name, rest) = after.split_once(' ')?;
    Some(DomainLine {
        id: id.parse().ok()?,
        name,
        rest,
    })
}

/// A whole serial log, with queries for the protocol's lines.
#[derive(Clone, Debug, Default)]
pub struct SerialLog {
    pub lines: Vec<String>,
}

impl SerialLog {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        SerialLog {
            lines: split_lines(bytes),
        }
    }

    /// The hypervisor's overall verdict (the first result line).
    pub fn result(&self) -> Option<HvResult> {
        self.lines.iter().find_map(|line| result_of_line(line))
    }

    /// The first `lamina: PANIC` line, if the hypervisor panicked.
    pub fn panic_line(&self) -> Option<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .find(|line| line.starts_with("lamina: PANIC"))
    }

    pub fn has_line(&self, pattern: LinePattern) -> bool {
        self.lines.iter().any(|line| pattern.matches(line))
    }

    fn domain_lines(&self) -> impl Iterator<Item = DomainLine<'_>> {
        self.lines.iter().filter_map(|line| domain_line(line))
    }

    /// The id of the domain called `name`, from its `started` line.
    pub fn domain_id(&self, name: &str) -> Option<u32> {
        self.domain_lines()
            .find(|d| d.name == name && d.rest.starts_with("started"))
            .map(|d| d.id)
    }

    /// Why module `name` was rejected, if it was.
    pub fn rejection(&self, name: &str) -> Option<&str> {
        self.lines.iter().find_map(|line| {
            let after = line.strip_prefix("lamina: module ")?;
            let (_index, after) = after.split_once(' ')?;
            let (module_name, why) = after.split_once(' ')?;
            (module_name == name).then(|| why.strip_prefix("rejected:").unwrap_or(why).trim())
        })
    }

    /// The detail of the hypervisor's `stopped:` line for domain `id`, if it stopped it.
    pub fn stop_detail(&self, id: u32) -> Option<&str> {
        self.domain_lines()
            .find(|d| d.id == id && d.rest.starts_with("stopped:"))
            .map(|d| d.rest["stopped:".len()..].trim())
    }

    /// How domain `id` ended, from its summary line (`poweroff`, `reboot`, `crash`, `fault`).
    pub fn end_of(&self, id: u32) -> Option<&str> {
        self.domain_lines()
            .find(|d| d.id == id && d.rest.starts_with("end="))
            .map(|d| {
                let end = &d.rest["end=".len()..];
                end.split_whitespace().next().unwrap_or("")
            })
    }

    /// The console lines of domain `id`, without the `(d<ID>) ` prefix.
    pub fn guest_lines(&self, id: u32) -> impl Iterator<Item = &str> {
        let prefix = format!("(d{id}) ");
        self.lines
            .iter()
            .filter_map(move |line| line.strip_prefix(prefix.as_str()))
    }

    /// The word on the guest's `Test result: <WORD>` line, if it printed one.
    pub fn test_result(&self, id: u32) -> Option<&str> {
        self.guest_lines(id).find_map(|line| {
            let word = line.strip_prefix("Test result: ")?;
            Some(word.split_whitespace().next().unwrap_or(""))
        })
    }

    /// The KiB of physical memory the hypervisor did not get back from its domains, from the
    /// summary's `lamina: memory: ... <L> KiB leaked` line.
    pub fn leaked_kib(&self) -> Option<u64> {
        self.lines.iter().find_map(|line| {
            let figures = line.strip_prefix("lamina: memory: ")?;
            let (_, leaked) = figures.rsplit_once(", ")?;
            leaked.strip_suffix(" KiB leaked")?.parse().ok()
        })
    }

    /// What is wrong with the memory accounting of a run that got to its result line: memory
    /// not returned, or no `lamina: memory:` line. `None` for a run without a result line
    /// (judged by its timeout or crash).
    pub fn memory_problem(&self) -> Option<String> {
        self.result()?;
        let line = || {
            self.lines
                .iter()
                .find(|line| line.starts_with("lamina: memory: "))
                .map_or("", String::as_str)
        };
        match self.leaked_kib() {
            Some(0) => None,
            Some(kib) => Some(format!("the hypervisor leaked {kib} KiB: `{}`", line())),
            None => Some("no `lamina: memory: ... KiB leaked` line in the summary".to_string()),
        }
    }

    /// The last `count` lines, for failure reports.
    pub fn tail(&self, count: usize) -> &[String] {
        &self.lines[self.lines.len().saturating_sub(count)..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "\
SeaBIOS noise\r
[hv] INFO Lamina starting
lamina: module 1 bad-elf rejected: not an ELF file
lamina: domain 1 sample-guest started mem=16M
(d1) Lamina sample guest
(d1) hello from the trapped UART
lamina: domain 2 triple_fault started mem=16M
(d2) Test result: SUCCESS
lamina: domain 10 other started mem=4M
(d10) Test result: FAILURE
lamina: domain 2 triple_fault stopped: triple fault (rip=0x200123)
lamina: summary
lamina: domain 1 sample-guest end=poweroff exits=42 vmcall=40 io=2
lamina: domain 2 triple_fault end=fault exits=3
lamina: module 1 bad-elf rejected: not an ELF file
lamina: memory: 1000 KiB free before domains, 1000 KiB at the end, 0 KiB leaked
lamina: result: failure
";

    fn log() -> SerialLog {
        SerialLog::from_bytes(RUN.as_bytes())
    }

    #[test]
    fn result_line_is_exact() {
        assert_eq!(
            result_of_line("lamina: result: success"),
            Some(HvResult::Success)
        );
        assert_eq!(
            result_of_line("lamina: result: failure\r"),
            Some(HvResult::Failure)
        );
        assert_eq!(result_of_line("lamina: result: succes"), None);
        assert_eq!(result_of_line("(d1) lamina: result: success"), None);
        assert_eq!(log().result(), Some(HvResult::Failure));
        assert_eq!(SerialLog::from_bytes(b"lamina: summary\n").result(), None);
    }

    #[test]
    fn lines_drop_carriage_returns_and_keep_a_partial_last_line() {
        assert_eq!(split_lines(b"a\r\nb\n\nc"), vec!["a", "b", "c"]);
        assert_eq!(split_lines(b"\xffx\n"), vec!["\u{fffd}x"]);
    }

    #[test]
    fn domains_are_found_by_name_from_their_started_line() {
        let log = log();
        assert_eq!(log.domain_id("sample-guest"), Some(1));
        assert_eq!(log.domain_id("triple_fault"), Some(2));
        assert_eq!(log.domain_id("other"), Some(10));
        assert_eq!(log.domain_id("bad-elf"), None);
    }

    #[test]
    fn a_stop_report_with_registers_and_hv_lines_after_it_is_read() {
        // docs/abi.md 18.7: the key registers on the `stopped:` line, the rest on `[hv]` lines,
        // and the summary's `nmi:` line, which nothing parses.
        let run = "\
lamina: domain 3 so started mem=4M
lamina: domain 3 so stopped: triple fault (rsp=0x80200000 cr2=0x801ffff8 rip=0x259564, while delivering #PF (vector 14) error code 0x2)
[hv] ERROR d3 so: rip=0x259564 rsp=0x80200000 rflags=0x10006 cs=0x8 ss=0x10
lamina: summary
lamina: domain 3 so end=fault exits=9
lamina: nmi: 0 host NMIs taken by the hypervisor, none given to a guest
lamina: memory: 10 KiB free before domains, 10 KiB at the end, 0 KiB leaked
lamina: result: failure
";
        let log = SerialLog::from_bytes(run.as_bytes());
        assert_eq!(
            log.stop_detail(3),
            Some(
                "triple fault (rsp=0x80200000 cr2=0x801ffff8 rip=0x259564, while delivering #PF (vector 14) error code 0x2)"
            )
        );
        assert_eq!(log.end_of(3), Some("fault"));
        assert_eq!(log.result(), Some(HvResult::Failure));
        assert_eq!(log.leaked_kib(), Some(0));
    }

    #[test]
    fn rejections_stops_and_ends_are_read() {
        let log = log();
        assert_eq!(log.rejection("bad-elf"), Some("not an ELF file"));
        assert_eq!(log.rejection("sample-guest"), None);
        assert_eq!(log.stop_detail(2), Some("triple fault (rip=0x200123)"));
        assert_eq!(log.stop_detail(1), None);
        assert_eq!(log.end_of(1), Some("poweroff"));
        assert_eq!(log.end_of(2), Some("fault"));
        assert_eq!(log.end_of(10), None);
    }

    #[test]
    fn guest_lines_do_not_mix_up_d1_and_d10() {
        let log = log();
        assert_eq!(log.test_result(1), None);
        assert_eq!(log.test_result(2), Some("SUCCESS"));
        assert_eq!(log.test_result(10), Some("FAILURE"));
        assert_eq!(log.guest_lines(1).count(), 2);
    }

    #[test]
    fn leaks_and_a_missing_memory_line_are_problems_of_finished_runs() {
        assert_eq!(log().leaked_kib(), Some(0));
        assert_eq!(log().memory_problem(), None);
        let leaked = RUN.replace("1000 KiB at the end, 0 KiB", "984 KiB at the end, 16 KiB");
        let leaked = SerialLog::from_bytes(leaked.as_bytes());
        assert_eq!(leaked.leaked_kib(), Some(16));
        assert!(leaked.memory_problem().unwrap().contains("leaked 16 KiB"));
        let without: String = RUN
            .lines()
            .filter(|l| !l.starts_with("lamina: memory:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let without = SerialLog::from_bytes(without.as_bytes());
        assert_eq!(without.leaked_kib(), None);
        assert!(without.memory_problem().is_some());
        let unfinished = SerialLog::from_bytes(b"lamina: domain 1 x started mem=4M\n");
        assert_eq!(unfinished.memory_problem(), None, "judged otherwise");
    }

    #[test]
    fn line_patterns() {
        let log = log();
        assert!(log.has_line(LinePattern::Contains("lamina: module 1 bad-elf rejected:")));
        assert!(log.has_line(LinePattern::StartsWithContaining {
            prefix: "(d1) ",
            needle: "Lamina"
        }));
        assert!(!log.has_line(LinePattern::StartsWithContaining {
            prefix: "(d2) ",
            needle: "Lamina"
        }));
        assert!(log.panic_line().is_none());
        assert_eq!(
            log.tail(2),
            [
                "lamina: memory: 1000 KiB free before domains, 1000 KiB at the end, 0 KiB leaked",
                "lamina: result: failure"
            ]
        );
    }
}
