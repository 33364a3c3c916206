//! The conformance suite: one boot per vendor with every selected test as its own domain, each
//! test judged from its domain's lines.
//!
//! The list of tests is the guest's own catalog, compiled into xtask from its source file, so
//! the two cannot disagree.

use std::time::Duration;

use crate::emulator::{RunOutcome, RunRecord, Vendor};
use crate::iso::BootModule;
use crate::report::{CaseReport, Judgement, Status, Suite};
use crate::workspace::Artifact;

// Pure data shared with the guest; not every item is needed on this side.
#[allow(dead_code)]
#[path = "../../conformance/src/catalog.rs"]
mod catalog;

pub use catalog::{CATALOG, EXPECTED_OUTPUT, Expect, ExpectedOutput, TestInfo};

/// The name conformance tests go by in filters and reports (`conformance/<test>`).
pub const SUITE_NAME: &str = "conformance";

/// The tests selected by `filter`, matched against `conformance/<test name>` (so `conformance`
/// selects them all).
pub fn select(filter: Option<&str>) -> Vec<&'static TestInfo> {
    CATALOG
        .iter()
        .filter(|t| filter.is_none_or(|f| format!("{SUITE_NAME}/{}", t.name).contains(f)))
        .collect()
}

/// One module per test, named after the test, with the smallest RAM a domain can have
/// (every test fits in it, and a boot holds dozens of them), and the words the test asks for
/// in its catalog entry (`privileged=1`).
pub fn boot_modules(tests: &[&TestInfo]) -> Vec<BootModule> {
    tests
        .iter()
        .map(|t| BootModule {
            path: Artifact::Conformance.path(),
            cmdline: match t.cmdline_extra {
                "" => format!("{} mem=4M", t.name),
                extra => format!("{} mem=4M {extra}", t.name),
            },
        })
        .collect()
}

/// The wall-clock limit for a run of `count` tests: the vendor's base limit (or the user's)
/// plus an allowance per domain.
pub fn timeout(vendor: Vendor, base: Option<Duration>, count: usize) -> Duration {
    let per_test = match vendor {
        Vendor::Amd => Duration::from_secs(3),
        Vendor::Intel => Duration::from_secs(5),
    };
    base.unwrap_or_else(|| vendor.default_timeout()) + per_test * count as u32
}

/// Judges one test from the run that included it.
pub fn judge(test: &TestInfo, record: &RunRecord) -> Judgement {
    let log = &record.log;
    // A test without a verdict of its own failed because the whole run ended early.
    let unfinished = |what: &str| match record.outcome() {
        RunOutcome::Timeout => {
            Judgement::new(Status::Timeout, format!("{what} before the timeout"))
        }
        RunOutcome::Crash => Judgement::new(Status::Crash, format!("{what}; {}", record.ending())),
        RunOutcome::Success | RunOutcome::Failure => match log.panic_line() {
            Some(panic) => Judgement::new(Status::Crash, format!("{what}; {panic}")),
            None => Judgement::new(Status::Error, what.to_string()),
        },
    };

    let Some(id) = log.domain_id(test.name) else {
        if let Some(why) = log.rejection(test.name) {
            return Judgement::new(Status::Error, format!("the module was rejected: {why}"));
        }
        return unfinished("the domain never started");
    };
    let stop = log.stop_detail(id);
    let end = log.end_of(id);
    let result = log.test_result(id);

    let verdict = match test.expect {
        Expect::StoppedByHv(expected) => match (stop, end) {
            (Some(detail), _) if detail.contains(expected) => Judgement::pass(),
            (Some(detail), _) => Judgement::new(
                Status::Fail,
                format!("stopped with `{detail}`, expected `{expected}`"),
            ),
            (None, Some(end)) => Judgement::new(
                Status::Fail,
                format!(
                    "ended with end={end} (test result {}), expected the hv to stop it: {expected}",
                    result.unwrap_or("none")
                ),
            ),
            (None, None) => unfinished("the domain neither stopped nor ended"),
        },
        Expect::Ends(expected) => match (end, stop) {
            (Some(end), None) if end == expected && result.is_none() => Judgement::pass(),
            (Some(end), None) => Judgement::new(
                Status::Fail,
                format!(
                    "end={end} (test result {}), expected end={expected} and no result",
                    result.unwrap_or("none")
                ),
            ),
            (_, Some(detail)) => {
                Judgement::new(Status::Fail, format!("the hv stopped the domain: {detail}"))
            }
            (None, None) => unfinished("the domain did not end"),
        },
        Expect::Success => match (result, end, stop) {
            (Some("SUCCESS"), Some("poweroff"), _) => Judgement::pass(),
            (Some("SKIP"), Some("poweroff"), _) => Judgement {
                status: Status::Skip,
                problems: Vec::new(),
            },
            (Some("FAILURE"), _, _) => Judgement::new(Status::Fail, "Test result: FAILURE"),
            (Some("ERROR"), _, _) => Judgement::new(Status::Error, "Test result: ERROR"),
            (_, _, Some(detail)) => {
                Judgement::new(Status::Fail, format!("the hv stopped the domain: {detail}"))
            }
            (Some(word), Some(end), None) => {
                Judgement::new(Status::Fail, format!("Test result: {word}, end={end}"))
            }
            (None, Some(end), None) => {
                Judgement::new(Status::Crash, format!("no `Test result:` line, end={end}"))
            }
            (_, None, None) => unfinished("the domain did not end"),
        },
    };
    match EXPECTED_OUTPUT.iter().find(|o| o.test == test.name) {
        Some(expected) if verdict.status == Status::Pass => {
            let lines: Vec<&str> = log.guest_lines(id).collect();
            match output_problems(test.name, expected, &lines) {
                problems if problems.is_empty() => verdict,
                problems => Judgement {
                    status: Status::Fail,
                    problems,
                },
            }
        }
        _ => verdict,
    }
}

/// What is wrong with a test domain's console `lines` against what it must print: a line
/// missing (or not whole, e.g. cut by another line), or, when only those lines may appear,
/// any other line besides the framework's own.
pub fn output_problems(name: &str, expected: &ExpectedOutput, lines: &[&str]) -> Vec<String> {
    let mut problems: Vec<String> = expected
        .lines
        .iter()
        .filter(|want| !lines.contains(want))
        .map(|want| format!("the console has no whole line `{want}`"))
        .collect();
    if expected.only {
        let framework = |line: &str| {
            line.starts_with("Test: ")
                || line.starts_with("Checks: ")
                || line.starts_with("Test result: ")
                || line == format!("{name}: all checks passed")
        };
        problems.extend(
            lines
                .iter()
                .filter(|line| !framework(line) && !expected.lines.contains(line))
                .map(|line| format!("stray console line `{}`", line.escape_debug())),
        );
    }
    problems
}

/// The report of one vendor's run.
pub fn suite(vendor: Vendor, tests: &[&TestInfo], record: &RunRecord) -> Suite {
    let cases = tests
        .iter()
        .map(|test| {
            let output = match record.log.domain_id(test.name) {
                Some(id) => record.log.guest_lines(id).map(str::to_string).collect(),
                None => Vec::new(),
            };
            CaseReport {
                name: test.name.to_string(),
                section: test.section.to_string(),
                title: test.title.to_string(),
                judgement: judge(test, record),
                output,
            }
        })
        .collect();
    Suite {
        name: vendor.name().to_string(),
        seconds: record.elapsed.as_secs_f64(),
        cases,
    }
}

/// Every test of a run that could not even start (ISO not built, emulator missing): all ERROR.
pub fn errored_suite(vendor: Vendor, tests: &[&TestInfo], why: &str) -> Suite {
    let cases = tests
        .iter()
        .map(|test| CaseReport {
            name: test.name.to_string(),
            section: test.section.to_string(),
            title: test.title.to_string(),
            judgement: Judgement::new(Status::Error, why),
            output: Vec::new(),
        })
        .collect();
    Suite {
        name: vendor.name().to_string(),
        seconds: 0.0,
        cases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::RunDir;
    use crate::serial_log::SerialLog;
    use std::path::PathBuf;

    #[test]
    fn expected_output_needs_whole_lines_and_nothing_stray() {
        let expected = ExpectedOutput {
            test: "t",
            lines: &["first line", "second line"],
            only: true,
        };
        let good = [
            "Test: t: x",
            "Checks: y",
            "first line",
            "second line",
            "t: all checks passed",
            "Test result: SUCCESS",
        ];
        assert!(output_problems("t", &expected, &good).is_empty());
        let interleaved = ["first second line", "line"];
        let problems = output_problems("t", &expected, &interleaved);
        assert_eq!(problems.len(), 4, "{problems:?}");
        let stray = ["Bfirst line", "first line", "second line"];
        assert_eq!(
            output_problems("t", &expected, &stray),
            ["stray console line `Bfirst line`"]
        );
        let lenient = ExpectedOutput {
            only: false,
            ..expected
        };
        assert!(output_problems("t", &lenient, &stray).is_empty());
        for output in EXPECTED_OUTPUT {
            assert!(
                CATALOG.iter().any(|t| t.name == output.test),
                "{}",
                output.test
            );
        }
    }

    const SUCCESS_TEST: TestInfo = TestInfo {
        name: "ok_test",
        title: "t",
        section: "1 s",
        expect: Expect::Success,
        cmdline_extra: "",
    };
    const STOPPED_TEST: TestInfo = TestInfo {
        name: "tf_test",
        title: "t",
        section: "1 s",
        expect: Expect::StoppedByHv("triple fault"),
        cmdline_extra: "",
    };

    fn record(text: &str, timed_out: bool) -> RunRecord {
        RunRecord {
            vendor: Vendor::Intel,
            dir: RunDir::new(PathBuf::from("/nonexistent")),
            log: SerialLog::from_bytes(text.as_bytes()),
            timed_out,
            elapsed: Duration::from_secs(9),
            time_to_result: None,
            exit_status: None,
        }
    }

    fn status(test: &TestInfo, text: &str) -> Status {
        judge(test, &record(text, false)).status
    }

    #[test]
    fn success_needs_the_result_line_and_a_poweroff() {
        let good = "lamina: domain 3 ok_test started mem=16M\n(d3) Test result: SUCCESS\n\
                    lamina: domain 3 ok_test end=poweroff exits=5\nlamina: result: failure\n";
        assert_eq!(status(&SUCCESS_TEST, good), Status::Pass);
        assert_eq!(
            status(&SUCCESS_TEST, &good.replace("SUCCESS", "SKIP")),
            Status::Skip
        );
        assert_eq!(
            status(&SUCCESS_TEST, &good.replace("SUCCESS", "FAILURE")),
            Status::Fail
        );
        assert_eq!(
            status(&SUCCESS_TEST, &good.replace("end=poweroff", "end=crash")),
            Status::Fail
        );
        assert_eq!(
            status(
                &SUCCESS_TEST,
                &good.replace("(d3) Test result: SUCCESS\n", "")
            ),
            Status::Crash
        );
        // Another domain's result line does not count.
        assert_eq!(
            status(&SUCCESS_TEST, &good.replace("(d3) Test", "(d33) Test")),
            Status::Crash
        );
    }

    #[test]
    fn unfinished_runs_are_timeouts_or_crashes() {
        let partial = "lamina: domain 1 ok_test started mem=16M\n(d1) Test result: SUCCESS\n";
        assert_eq!(
            judge(&SUCCESS_TEST, &record(partial, true)).status,
            Status::Timeout
        );
        assert_eq!(
            judge(&SUCCESS_TEST, &record(partial, false)).status,
            Status::Crash
        );
        assert_eq!(
            judge(&SUCCESS_TEST, &record("", false)).status,
            Status::Crash
        );
        let panicked = format!("{partial}lamina: PANIC #GP\nlamina: result: failure\n");
        assert_eq!(status(&SUCCESS_TEST, &panicked), Status::Crash);
    }

    const REBOOT_TEST: TestInfo = TestInfo {
        name: "rb_test",
        title: "t",
        section: "1 s",
        expect: Expect::Ends("reboot"),
        cmdline_extra: "",
    };

    #[test]
    fn an_expected_ending_needs_that_end_word_and_no_result() {
        let run = |end: &str, result: &str| {
            let text = format!(
                "lamina: domain 4 rb_test started mem=4M\n{result}lamina: summary\n\
                 lamina: domain 4 rb_test end={end} cpu_ms=0 exits=3\nlamina: result: failure\n"
            );
            status(&REBOOT_TEST, &text)
        };
        assert_eq!(run("reboot", ""), Status::Pass);
        assert_eq!(
            run("poweroff", ""),
            Status::Fail,
            "a reboot reported as power-off"
        );
        assert_eq!(run("crash", ""), Status::Fail);
        assert_eq!(
            run("reboot", "(d4) Test result: SUCCESS\n"),
            Status::Fail,
            "it came back"
        );
    }

    #[test]
    fn stopped_by_hv_needs_the_expected_detail() {
        let stopped = "lamina: domain 2 tf_test started mem=16M\n\
                       lamina: domain 2 tf_test stopped: triple fault at rip=0x201000\n";
        // Judged as soon as the stop line is there, whatever happens after.
        assert_eq!(
            judge(&STOPPED_TEST, &record(stopped, true)).status,
            Status::Pass
        );
        assert_eq!(
            status(
                &STOPPED_TEST,
                &stopped.replace("triple fault", "unexpected exit 48")
            ),
            Status::Fail
        );
        let powered_off = "lamina: domain 2 tf_test started mem=16M\n\
                           lamina: domain 2 tf_test end=poweroff exits=3\nlamina: result: success\n";
        assert_eq!(status(&STOPPED_TEST, powered_off), Status::Fail);
    }

    #[test]
    fn rejected_or_missing_modules_are_errors() {
        let rejected = "lamina: module 1 ok_test rejected: too big\nlamina: result: failure\n";
        let judgement = judge(&SUCCESS_TEST, &record(rejected, false));
        assert_eq!(judgement.status, Status::Error);
        assert_eq!(judgement.problems, ["the module was rejected: too big"]);
        assert_eq!(
            status(&SUCCESS_TEST, "lamina: result: failure\n"),
            Status::Error
        );
    }

    #[test]
    fn filter_matches_suite_prefixed_names() {
        assert_eq!(select(Some("conformance")).len(), CATALOG.len());
        assert_eq!(select(None).len(), CATALOG.len());
        let first = CATALOG[0].name;
        assert!(select(Some(first)).iter().any(|t| t.name == first));
        assert!(select(Some("no-such-test-anywhere")).is_empty());
    }

    #[test]
    fn command_lines_carry_the_name_the_size_and_the_extra_words() {
        let privileged = TestInfo {
            name: "priv_test",
            cmdline_extra: "privileged=1",
            ..SUCCESS_TEST
        };
        let modules = boot_modules(&[&SUCCESS_TEST, &privileged]);
        assert_eq!(modules[0].cmdline, "ok_test mem=4M");
        assert_eq!(modules[1].cmdline, "priv_test mem=4M privileged=1");
        // Every catalog test that asks for privilege gets it, and only those.
        let all: Vec<&TestInfo> = CATALOG.iter().collect();
        for (test, module) in all.iter().zip(boot_modules(&all)) {
            assert_eq!(
                module.cmdline.ends_with(" privileged=1"),
                test.cmdline_extra.contains("privileged=1"),
                "{}",
                test.name
            );
        }
    }

    #[test]
    fn catalog_names_are_unique_and_usable_as_domain_names() {
        let mut names: Vec<&str> = CATALOG.iter().map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            CATALOG.len(),
            "duplicate test names in the catalog"
        );
        for name in names {
            assert!(
                !name.is_empty() && !name.contains(['=', ' ']),
                "bad test name {name:?}"
            );
        }
    }
}
