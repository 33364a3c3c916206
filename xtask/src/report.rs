//! Results and how they are shown: the console table, TAP 13 and JUnit XML.

use std::fmt::Write as _;

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

/// A plain text table with left-aligned columns.
#[derive(Clone, Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: Vec<String>) -> Self {
        Table { rows: vec![header] }
    }

    pub fn add_row(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
            })
            .map(|w| w.unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (index, row) in self.rows.iter().enumerate() {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
            if index == 0 {
                let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
                out.push_str(&rule.join("  "));
                out.push('\n');
            }
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

/// JUnit XML as CI systems read it: `<testsuites>` with one `<testsuite>` per run, test cases
/// classed `<name>.<suite>` (dots split packages in some viewers, so no section). Fail maps to
/// `<failure>`; Error, Crash and Timeout to `<error>`; Skip to `<skipped>`.
pub fn junit(name: &str, suites: &[Suite]) -> String {
    let count = |suite: &Suite, wanted: &[Status]| {
        suite
            .cases
            .iter()
            .filter(|c| wanted.contains(&c.judgement.status))
            .count()
    };
    const ERRORS: &[Status] = &[Status::Error, Status::Crash, Status::Timeout];
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
        xml(name),
        suites.iter().map(|s| s.cases.len()).sum::<usize>(),
        suites
            .iter()
            .map(|s| count(s, &[Status::Fail]))
            .sum::<usize>(),
        suites.iter().map(|s| count(s, ERRORS)).sum::<usize>(),
        suites
            .iter()
            .map(|s| count(s, &[Status::Skip]))
            .sum::<usize>(),
        suites.iter().map(|s| s.seconds).sum::<f64>(),
    );
    for suite in suites {
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
            xml(&suite.name),
            suite.cases.len(),
            count(suite, &[Status::Fail]),
            count(suite, ERRORS),
            count(suite, &[Status::Skip]),
            suite.seconds,
        );
        for case in &suite.cases {
            let _ = write!(
                out,
                "    <testcase name=\"{}\" classname=\"{}.{}\" time=\"0\">",
                xml(&case.name),
                xml(name),
                xml(&suite.name),
            );
            let message = xml(&case.judgement.problems.join("; "));
            let status = case.judgement.status;
            match status {
                Status::Pass => {}
                Status::Skip => {
                    out.push_str("\n      <skipped message=\"the guest reported SKIP\"/>")
                }
                Status::Fail => {
                    let _ = write!(
                        out,
                        "\n      <failure message=\"{message}\" type=\"FAIL\"/>"
                    );
                }
                Status::Error | Status::Crash | Status::Timeout => {
                    let _ = write!(
                        out,
                        "\n      <error message=\"{message}\" type=\"{}\"/>",
                        status.label()
                    );
                }
            }
            if !case.output.is_empty() {
                let _ = write!(
                    out,
                    "\n      <system-out>{}</system-out>",
                    xml(&case.output.join("\n"))
                );
            }
            if status == Status::Pass && case.output.is_empty() {
                out.push_str("</testcase>\n");
            } else {
                out.push_str("\n    </testcase>\n");
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// Text for XML attributes and content: the five special characters escaped, and characters
/// XML 1.0 forbids (most control characters) replaced.
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
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
        assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"lamina-conformance\" tests=\"4\" failures=\"1\" errors=\"1\" skipped=\"1\" time=\"9.750\">\n"));
        assert!(xml.contains("  <testsuite name=\"amd\" tests=\"2\" failures=\"0\" errors=\"0\" skipped=\"1\" time=\"2.500\">\n"));
        assert!(xml.contains("    <testcase name=\"passes\" classname=\"lamina-conformance.amd\" time=\"0\"></testcase>\n"));
        assert!(xml.contains("<skipped message=\"the guest reported SKIP\"/>"));
        assert!(xml.contains("<failure message=\"Test result: FAILURE\" type=\"FAIL\"/>"));
        assert!(
            xml.contains("<system-out>expected 0 got &lt;1&gt; &amp; &apos;x&apos;</system-out>")
        );
        assert!(xml.contains("<error message=\"no result line\" type=\"CRASH\"/>"));
        assert!(xml.ends_with("  </testsuite>\n</testsuites>\n"));
        // Balanced elements.
        assert_eq!(
            xml.matches("<testcase ").count(),
            xml.matches("</testcase>").count()
        );
        assert_eq!(
            xml.matches("<testsuite ").count(),
            xml.matches("</testsuite>").count()
        );
    }

    #[test]
    fn xml_replaces_forbidden_control_characters() {
        assert_eq!(xml("a\x00b\x1bc\td"), "a\u{fffd}b\u{fffd}c\td");
    }

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(vec!["scenario".into(), "amd".into()]);
        table.add_row(vec!["x".into(), "PASS 1.0s".into()]);
        assert_eq!(
            table.render(),
            "scenario  amd\n--------  ---------\nx         PASS 1.0s\n"
        );
    }
}
