//! Checks of the multi-domain scenarios (`sample-domains`: ping and pong over a granted ring,
//! the snoop, the crash, the control domain): what the guests' result lines say, held against
//! each other and against the hypervisor's lines, beyond the line patterns of the scenario.

use std::collections::HashMap;

use crate::serial_log::SerialLog;

/// The fewest messages the ping/pong sample must exchange.
pub const MIN_MESSAGES: u64 = 10_000;

type Check = std::result::Result<String, String>;

/// The `key=value` words of domain `id`'s first console line starting with `prefix`.
fn result_fields<'a>(
    log: &'a SerialLog,
    id: u32,
    prefix: &str,
) -> std::result::Result<HashMap<&'a str, &'a str>, String> {
    let line = log
        .guest_lines(id)
        .find_map(|line| line.strip_prefix(prefix))
        .ok_or_else(|| format!("no line `(d{id}) {prefix}...`"))?;
    Ok(line
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .collect())
}

/// Field `key` of `fields` as a number.
fn number(
    fields: &HashMap<&str, &str>,
    key: &str,
    whose: &str,
) -> std::result::Result<f64, String> {
    let value = fields
        .get(key)
        .ok_or_else(|| format!("{whose} has no {key}="))?;
    value
        .parse::<f64>()
        .map_err(|_| format!("{whose}: {key}={value} is not a number"))
}

/// Where the first line containing `text` is, for checks of order.
fn position(log: &SerialLog, text: &str) -> Option<usize> {
    log.lines.iter().position(|line| line.contains(text))
}

/// Whether the first line containing `earlier` comes before the first containing `later`.
pub fn in_order(log: &SerialLog, earlier: &str, later: &str) -> std::result::Result<(), String> {
    match (position(log, earlier), position(log, later)) {
        (Some(a), Some(b)) if a < b => Ok(()),
        (Some(_), Some(_)) => Err(format!("{later:?} came before {earlier:?}")),
        (None, _) => Err(format!("no line containing {earlier:?}")),
        (_, None) => Err(format!("no line containing {later:?}")),
    }
}

/// The summary's memory line (`lamina: memory: <a> KiB free before domains, <b> KiB at the
/// end, <c> KiB leaked`): every domain's memory came back, nothing leaked.
pub fn memory_balanced(log: &SerialLog) -> std::result::Result<String, String> {
    let line = log
        .lines
        .iter()
        .find_map(|line| line.strip_prefix("lamina: memory: "))
        .ok_or("no `lamina: memory:` line in the summary")?;
    let figures: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|word| word.parse().ok())
        .collect();
    match figures[..] {
        [before, after, 0] if before == after => {
            Ok(format!("{after} KiB free before and after, 0 leaked"))
        }
        _ => Err(format!("memory not balanced: {line}")),
    }
}

/// Ping's and pong's result lines (domains `ping` and `pong`): at least `min_messages` each,
/// the same on both sides, no error, every byte checked on both sides, a rate. Returns the
/// figures as a report.
pub fn exchange_report(log: &SerialLog, ping: u32, pong: u32, min_messages: u64) -> Check {
    let ping_fields = result_fields(log, ping, "ping: result: ")?;
    let pong_fields = result_fields(log, pong, "pong: result: ")?;
    let ping_messages = number(&ping_fields, "messages", "ping")?;
    let pong_messages = number(&pong_fields, "messages", "pong")?;
    let mut problems = Vec::new();
    if ping_messages < min_messages as f64 {
        problems.push(format!(
            "ping exchanged {ping_messages} messages, fewer than {min_messages}"
        ));
    }
    if pong_messages != ping_messages {
        problems.push(format!(
            "pong answered {pong_messages}, ping got {ping_messages} answers"
        ));
    }
    for (whose, fields) in [("ping", &ping_fields), ("pong", &pong_fields)] {
        if number(fields, "errors", whose)? != 0.0 {
            problems.push(format!("{whose} reports errors={}", fields["errors"]));
        }
    }
    // Answers are as long as their requests: both sides checked the same number of bytes.
    let ping_bytes = number(&ping_fields, "bytes_checked", "ping")?;
    let pong_bytes = number(&pong_fields, "bytes_checked", "pong")?;
    if ping_bytes != pong_bytes || ping_bytes < ping_messages {
        problems.push(format!(
            "bytes checked: ping {ping_bytes}, pong {pong_bytes}, for {ping_messages} messages"
        ));
    }
    let rate = number(&ping_fields, "messages_per_s", "ping")?;
    if rate <= 0.0 {
        problems.push(format!("ping's rate is {rate} messages/s"));
    }
    let report = format!(
        "{ping_messages} messages, every byte checked ({ping_bytes} each way), {rate} messages/s in {} ms, exits per message: ping {}, pong {}",
        ping_fields.get("elapsed_ms").unwrap_or(&"?"),
        ping_fields.get("exits_per_message").unwrap_or(&"?"),
        pong_fields.get("exits_per_message").unwrap_or(&"?"),
    );
    if problems.is_empty() {
        Ok(report)
    } else {
        Err(format!("{}; {report}", problems.join("; ")))
    }
}

/// `ping-pong-grant`: domains 1 (ping) and 2 (pong).
pub fn check_ping_pong(log: &SerialLog) -> Check {
    let exchange = exchange_report(log, 1, 2, MIN_MESSAGES)?;
    Ok(format!("{exchange}; {}", memory_balanced(log)?))
}

/// `grant-required`: ping (1) and pong (2) finish their exchange although the snoop (3) was
/// stopped while they ran.
pub fn check_grant_required(log: &SerialLog) -> Check {
    let exchange = exchange_report(log, 1, 2, 1)?;
    in_order(
        log,
        "lamina: domain 3 snoop stopped:",
        "(d1) ping: result: ",
    )?;
    let memory = memory_balanced(log)?;
    Ok(format!(
        "snoop stopped first, then ping and pong finished: {exchange}; {memory}"
    ))
}

/// `crash-contained`: ping (1) crashed after `crash_after=500` and was torn down; pong (2)
/// noticed it after the crash, at 500 messages or more, with its port unbound, and ran on.
pub fn check_crash_contained(log: &SerialLog) -> Check {
    let gone = log
        .guest_lines(2)
        .find_map(|line| line.strip_prefix("pong: domain 1 is gone after "))
        .ok_or("pong never said domain 1 is gone")?;
    let answered: u64 = gone
        .split_whitespace()
        .next()
        .and_then(|word| word.parse().ok())
        .ok_or_else(|| format!("cannot read pong's count from {gone:?}"))?;
    if !gone.contains(": port 2 is unbound for domain 1") {
        return Err(format!(
            "pong's port did not turn unbound for domain 1: {gone:?}"
        ));
    }
    if answered < 500 {
        return Err(format!(
            "pong saw ping go after {answered} messages, before crash_after=500"
        ));
    }
    in_order(
        log,
        "(d1) ping: crash_after=500",
        "lamina: domain 1 ping torn down",
    )?;
    // Pong is told when ping's channels close, which may come before ping's RAM is all
    // scrubbed and its teardown line printed (docs/abi.md 17): no order between those two.
    in_order(
        log,
        "(d1) ping: crash_after=500",
        "(d2) pong: domain 1 is gone after",
    )?;
    in_order(
        log,
        "(d2) pong: domain 1 is gone after",
        "(d2) pong: still running:",
    )?;
    let memory = memory_balanced(log)?;
    Ok(format!(
        "ping crashed and was torn down; pong noticed after {answered} messages and ran on; {memory}"
    ))
}

/// One `control: <what>ed the worker: ... cpu_ns <a> -> <b> ...` line: `(a, b)`.
fn cpu_ns_of(log: &SerialLog, what: &str) -> std::result::Result<(u64, u64), String> {
    let prefix = format!("control: {what} the worker: ");
    let line = log
        .guest_lines(1)
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .ok_or_else(|| format!("no line `(d1) {prefix}...`"))?;
    let after = line
        .split_once("cpu_ns ")
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("no cpu_ns in {line:?}"))?;
    let mut words = after.split_whitespace();
    let before: Option<u64> = words.next().and_then(|w| w.parse().ok());
    let arrow = words.next();
    let later: Option<u64> = words.next().and_then(|w| w.parse().ok());
    match (before, arrow, later) {
        (Some(before), Some("->"), Some(later)) => Ok((before, later)),
        _ => Err(format!("cannot read cpu_ns from {line:?}")),
    }
}

/// `control-ops`: control (1) ran every check without a failure, the paused worker's CPU time
/// stood still and the unpaused one's advanced (read from control's own lines again here, so
/// a control domain that checks wrongly cannot pass on its own say).
pub fn check_control_ops(log: &SerialLog) -> Check {
    let fields = result_fields(log, 1, "control: result: ")?;
    let checks = number(&fields, "checks", "control")?;
    let failed = number(&fields, "failed", "control")?;
    if failed != 0.0 || checks < 20.0 {
        return Err(format!(
            "control: {failed} of {checks} checks failed (at least 20 expected)"
        ));
    }
    let (paused_from, paused_to) = cpu_ns_of(log, "paused")?;
    let (running_from, running_to) = cpu_ns_of(log, "unpaused")?;
    if paused_from != paused_to {
        return Err(format!(
            "the paused worker ran: cpu_ns {paused_from} -> {paused_to}"
        ));
    }
    if running_to <= running_from {
        return Err(format!(
            "the unpaused worker did not run: cpu_ns {running_from} -> {running_to}"
        ));
    }
    in_order(
        log,
        "(d2) worker: ready",
        "(d1) control: read the worker's console",
    )?;
    in_order(
        log,
        "lamina: domain 2 worker torn down:",
        "(d1) control: destroyed the worker",
    )?;
    let memory = memory_balanced(log)?;
    Ok(format!(
        "{checks} checks passed; paused worker at {paused_to} ns, {} ms more CPU once unpaused; {memory}",
        (running_to - running_from) / 1_000_000
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXCHANGE: &str = "\
(d1) ping: result: messages=10000 errors=0 bytes_checked=565000 elapsed_ms=812.500 messages_per_s=12307 exits_per_message=0.130
(d2) pong: result: messages=10000 errors=0 bytes_checked=565000 exits_per_message=0.125
lamina: memory: 511350 KiB free before domains, 511350 KiB at the end, 0 KiB leaked
";

    fn log(text: &str) -> SerialLog {
        SerialLog::from_bytes(text.as_bytes())
    }

    #[test]
    fn a_clean_exchange_passes_and_reports_the_rate() {
        let report = check_ping_pong(&log(EXCHANGE)).unwrap();
        assert!(report.contains("12307 messages/s"), "{report}");
        assert!(report.contains("ping 0.130, pong 0.125"), "{report}");
    }

    #[test]
    fn errors_short_runs_and_disagreements_fail() {
        for broken in [
            EXCHANGE.replacen("errors=0", "errors=3", 1),
            EXCHANGE.replace("messages=10000", "messages=9999"),
            EXCHANGE.replacen("messages=10000 errors", "messages=10016 errors", 1),
            EXCHANGE.replacen("bytes_checked=565000", "bytes_checked=564000", 1),
            EXCHANGE.replace("messages_per_s=12307", "messages_per_s=0"),
            EXCHANGE.replace("(d2) pong: result:", "(d2) pong: resulted:"),
            EXCHANGE.replace(
                "511350 KiB at the end, 0 KiB",
                "511346 KiB at the end, 4 KiB",
            ),
            EXCHANGE.replace("lamina: memory:", "lamina: memories:"),
        ] {
            assert!(check_ping_pong(&log(&broken)).is_err(), "{broken}");
        }
    }

    #[test]
    fn the_snoop_must_be_stopped_while_the_others_run() {
        let stopped = "lamina: domain 3 snoop stopped: access outside its memory\n";
        assert!(check_grant_required(&log(&format!("{stopped}{EXCHANGE}"))).is_ok());
        assert!(check_grant_required(&log(&format!("{EXCHANGE}{stopped}"))).is_err());
        assert!(check_grant_required(&log(EXCHANGE)).is_err());
    }

    const CRASH: &str = "\
(d1) ping: crash_after=500: 500 answers in, 16 requests in flight; crashing on purpose
lamina: domain 1 ping torn down: 4096 KiB RAM scrubbed and returned
(d2) pong: domain 1 is gone after 516 of 5000 messages (the ring's indices turned to nonsense): port 2 is unbound for domain 1, vCPU 0, masked
(d2) pong: still running: 2000 more messages through a ring of its own, 0 errors; powering off
lamina: memory: 511350 KiB free before domains, 511350 KiB at the end, 0 KiB leaked
";

    #[test]
    fn the_survivor_must_notice_after_the_teardown() {
        assert!(check_crash_contained(&log(CRASH)).is_ok());
        let early = CRASH.replace("after 516 of", "after 499 of");
        assert!(check_crash_contained(&log(&early)).is_err());
        let connected = CRASH.replace("is unbound for domain 1", "is inter-domain with domain 1");
        assert!(check_crash_contained(&log(&connected)).is_err());
        let lines: Vec<&str> = CRASH.lines().collect();
        // Pong may be told before the teardown line, never before the crash.
        let told_first = [lines[0], lines[2], lines[1], lines[3], lines[4]].join("\n");
        assert!(check_crash_contained(&log(&told_first)).is_ok());
        let before_crash = [lines[2], lines[0], lines[1], lines[3], lines[4]].join("\n");
        assert!(check_crash_contained(&log(&before_crash)).is_err());
        let no_teardown = [lines[0], lines[2], lines[3], lines[4]].join("\n");
        assert!(check_crash_contained(&log(&no_teardown)).is_err());
    }

    const CONTROL: &str = "\
(d2) worker: ready, computing until destroyed
(d1) control: read the worker's console, bytes 0..180: found \"worker: ready, computing until destroyed\"
(d1) control: paused the worker: state=paused, cpu_ns 5000000 -> 5000000 over 30 ms
(d1) control: unpaused the worker: state=running, cpu_ns 5000000 -> 34000000 over 30 ms
lamina: domain 2 worker torn down: 4096 KiB RAM and 16 KiB of hypervisor structures scrubbed and returned, 507238 KiB free
(d1) control: destroyed the worker: state=shutdown ending=destroyed memory_bytes=0
(d1) control: result: checks=24 failed=0
lamina: summary
lamina: memory: 511350 KiB free before domains, 511350 KiB at the end, 0 KiB leaked
";

    #[test]
    fn control_must_pause_for_real_and_report_no_failure() {
        assert!(check_control_ops(&log(CONTROL)).is_ok());
        for broken in [
            CONTROL.replace("5000000 -> 5000000", "5000000 -> 5100000"),
            CONTROL.replace("5000000 -> 34000000", "5000000 -> 5000000"),
            CONTROL.replace("failed=0", "failed=1"),
            CONTROL.replace("checks=24", "checks=3"),
        ] {
            assert!(check_control_ops(&log(&broken)).is_err(), "{broken}");
        }
    }
}
