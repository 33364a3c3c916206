//! Results and how they are shown: the console table, TAP 13 and JUnit XML.

use std::fmt::Write as _;
use std::time::Duration;

use comfy_table::{ContentArrangement, ContentLineStyle, LineStyle, TableStyle};
use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

/// How one test or scenario went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    /// The guest decided the test does not apply (counts as passing).
    Skip,
    /// The test ran and reported or showed the wrong behaviour.
    Fail,
    /// The test could not be judged: it never ran, or the run made no sense.
    Error,
    /// The emulator ended without the hypervisor's result line.
    Crash,
    /// No result before the wall-clock limit.
    Timeout,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Skip => "SKIP",
            Status::Fail => "FAIL",
            Status::Error => "ERROR",
            Status::Crash => "CRASH",
            Status::Timeout => "TIMEOUT",
        }
    }

    pub fn is_ok(self) -> bool {
        matches!(self, Status::Pass | Status::Skip)
    }
}

/// A status and, unless it passed, what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub status: Status,
    pub problems: Vec<String>,
}

impl Judgement {
    pub fn new(status: Status, problem: impl Into<String>) -> Self {
        Judgement {
            status,
            problems: vec![problem.into()],
        }
    }

    pub fn pass() -> Self {
        Judgement {
            status: Status::Pass,
            problems: Vec::new(),
        }
    }
}

/// A plain text table (comfy-table): left-aligned columns two spaces apart, a rule of dashes
/// under the header.
#[derive(Clone, Debug)]
pub struct Table {
    table: comfy_table::Table,
}

/// No borders; a blank between columns, a rule under the header (each column's rule also
/// runs under its one-blank right padding).
const TABLE_STYLE: TableStyle = TableStyle::new()
    .header_lines(ContentLineStyle::none().junction(' '))
    .header_separator(LineStyle::none().fill('-').junction(' '))
    .content_lines(ContentLineStyle::none().junction(' '));

impl Table {
    pub fn new(header: Vec<String>) -> Self {
        let mut table = comfy_table::Table::new();
        table
            .load_style(TABLE_STYLE)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(header);
        Table { table }
    }

    pub fn add_row(&mut self, row: Vec<String>) {
        self.table.add_row(row);
    }

    pub fn render(&self) -> String {
        let mut table = self.table.clone();
        for column in table.column_iter_mut() {
            column.set_padding((0, 1));
        }
        let mut out = String::new();
        for line in table.lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// One test case in a machine-readable report.
#[derive(Clone, Debug)]
pub struct CaseReport {
    pub name: String,
    /// The docs/abi.md section the test checks.
    pub section: String,
    pub title: String,
    pub judgement: Judgement,
    /// What the test printed, for the report's output field.
    pub output: Vec<String>,
}

/// The cases of one run (one vendor).
#[derive(Clone, Debug)]
pub struct Suite {
    pub name: String,
    /// Wall-clock time of the whole run; the cases share it.
    pub seconds: f64,
    pub cases: Vec<CaseReport>,
}

/// TAP version 13: one `ok`/`not ok` line per case, named `<suite>/<case>`, with a YAML block
/// for anything that did not pass.
pub fn tap(suites: &[Suite]) -> String {
    let total: usize = suites.iter().map(|s| s.cases.len()).sum();
    let mut out = format!("TAP version 13\n1..{total}\n");
    let mut number = 0;
    for suite in suites {
        for case in &suite.cases {
            number += 1;
            let status = case.judgement.status;
            let ok = if status.is_ok() { "ok" } else { "not ok" };
            let description = tap_text(&format!("{}/{}", suite.name, case.name));
            let _ = write!(out, "{ok} {number} - {description}");
            if status == Status::Skip {
                out.push_str(" # SKIP the guest reported SKIP");
            }
            out.push('\n');
            if !status.is_ok() {
                out.push_str("  ---\n");
                let _ = writeln!(out, "  status: {}", status.label());
                let _ = writeln!(
                    out,
                    "  message: {}",
                    yaml_quoted(&case.judgement.problems.join("; "))
                );
                let _ = writeln!(out, "  section: {}", yaml_quoted(&case.section));
                let _ = writeln!(out, "  title: {}", yaml_quoted(&case.title));
                if !case.output.is_empty() {
                    out.push_str("  output: |-\n");
                    for line in &case.output {
                        let _ = writeln!(out, "    {}", printable(line));
                    }
                }
                out.push_str("  ...\n");
            }
        }
    }
    out
}

/// A TAP description: one line, `#` escaped (it would start a directive).
fn tap_text(text: &str) -> String {
    printable(text).replace('#', "\\#")
}

fn yaml_quoted(text: &str) -> String {
    format!("'{}'", printable(text).replace('\'', "''"))
}

/// Control characters (terminal escapes from a guest, say) replaced by U+FFFD.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// JUnit XML as CI systems read it (quick-junit writes it): `<testsuites>` with one
/// `<testsuite>` per run, test cases classed `<name>.<suite>` (dots split packages in some
/// viewers, so no section). Fail maps to `<failure>`; Error, Crash and Timeout to `<error>`;
/// Skip to `<skipped>`; what a test printed to `<system-out>`.
pub fn junit(name: &str, suites: &[Suite]) -> String {
    let mut report = Report::new(name);
    report.set_time(Duration::from_secs_f64(
        suites.iter().map(|s| s.seconds.max(0.0)).sum(),
    ));
    for suite in suites {
        let mut test_suite = TestSuite::new(suite.name.as_str());
        test_suite.set_time(Duration::from_secs_f64(suite.seconds.max(0.0)));
        for case in &suite.cases {
            let message = case.judgement.problems.join("; ");
            let status = match case.judgement.status {
                Status::Pass => TestCaseStatus::success(),
                Status::Skip => {
                    let mut status = TestCaseStatus::skipped();
                    status.set_message("the guest reported SKIP");
                    status
                }
                Status::Fail => {
                    let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    status.set_message(message).set_type("FAIL");
                    status
                }
                other @ (Status::Error | Status::Crash | Status::Timeout) => {
                    let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
                    status.set_message(message).set_type(other.label());
                    status
                }
            };
            let mut test_case = TestCase::new(case.name.as_str(), status);
            test_case
                .set_classname(format!("{name}.{}", suite.name))
                .set_time(Duration::ZERO);
            if !case.output.is_empty() {
                test_case.set_system_out(case.output.join("\n"));
            }
            test_suite.add_test_case(test_case);
        }
        report.add_test_suite(test_suite);
    }
    // Serializing into memory fails only on a bug in the crate: say so in the file rather
    // than lose the run.
    report
        .to_string()
        .unwrap_or_else(|err| format!("<!-- quick-junit could not write the report: {err} -->\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, status: Status, problem: &str, output: &[&str]) -> CaseReport {
        CaseReport {
            name: name.to_string(),
            section: "2.1 Hypercall instructions".to_string(),
            title: "what it checks".to_string(),
            judgement: Judgement {
                status,
                problems: if problem.is_empty() {
                    vec![]
                } else {
                    vec![problem.to_string()]
                },
            },
            output: output.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn suites() -> Vec<Suite> {
        vec![
            Suite {
                name: "amd".to_string(),
                seconds: 2.5,
                cases: vec![
                    case("passes", Status::Pass, "", &[]),
                    case("skips", Status::Skip, "", &[]),
                ],
            },
            Suite {
                name: "intel".to_string(),
                seconds: 7.25,
                cases: vec![
                    case(
                        "fails",
                        Status::Fail,
                        "Test result: FAILURE",
                        &["expected 0 got <1> & 'x'"],
                    ),
                    case("crashes", Status::Crash, "no result line", &[]),
                ],
            },
        ]
    }

    #[test]
    fn tap_numbers_cases_and_explains_failures() {
        let tap = tap(&suites());
        let expected = "\
TAP version 13
1..4
ok 1 - amd/passes
ok 2 - amd/skips # SKIP the guest reported SKIP
not ok 3 - intel/fails
  ---
  status: FAIL
  message: 'Test result: FAILURE'
  section: '2.1 Hypercall instructions'
  title: 'what it checks'
  output: |-
    expected 0 got <1> & 'x'
  ...
not ok 4 - intel/crashes
  ---
  status: CRASH
  message: 'no result line'
  section: '2.1 Hypercall instructions'
  title: 'what it checks'
  ...
";
        assert_eq!(tap, expected);
    }

    #[test]
    fn tap_escapes_hashes_and_quotes() {
        assert_eq!(tap_text("a#b"), "a\\#b");
        assert_eq!(yaml_quoted("it's"), "'it''s'");
        assert_eq!(printable("a\x1b[0mb"), "a\u{fffd}[0mb");
    }

    #[test]
    fn junit_counts_and_escapes() {
        let xml = junit("lamina-conformance", &suites());
        assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"lamina-conformance\" tests=\"4\" skipped=\"1\" failures=\"1\" errors=\"1\" time=\"9.750\">\n"), "{xml}");
        assert!(xml.contains("<testsuite name=\"amd\" tests=\"2\" skipped=\"1\" errors=\"0\" failures=\"0\" time=\"2.500\">\n"));
        assert!(xml.contains(
            "<testcase name=\"passes\" classname=\"lamina-conformance.amd\" time=\"0.000\"/>\n"
        ));
        assert!(xml.contains("<skipped message=\"the guest reported SKIP\"/>"));
        assert!(xml.contains("<failure message=\"Test result: FAILURE\" type=\"FAIL\"/>"));
        assert!(
            xml.contains("<system-out>expected 0 got &lt;1&gt; &amp; &apos;x&apos;</system-out>")
        );
        assert!(xml.contains("<error message=\"no result line\" type=\"CRASH\"/>"));
        assert!(xml.trim_end().ends_with("</testsuite>\n</testsuites>"));
        assert_eq!(xml.matches("<testsuite ").count(), 2);
        assert_eq!(
            xml.matches("<testsuite ").count(),
            xml.matches("</testsuite>").count()
        );
    }

    #[test]
    fn junit_drops_characters_xml_forbids() {
        let mut suites = suites();
        suites[0].cases[0].output = vec!["a\x00b\x1b[0mc".to_string()];
        let xml = junit("x", &suites);
        assert!(xml.contains("<system-out>abc</system-out>"), "{xml}");
    }

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(vec!["scenario".into(), "amd".into()]);
        table.add_row(vec!["x".into(), "PASS 1.0s".into()]);
        assert_eq!(
            table.render(),
            "scenario  amd\n--------- ----------\nx         PASS 1.0s\n"
        );
    }
}
