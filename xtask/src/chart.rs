//! The benchmark chart: a self-contained SVG of horizontal bars, instructions per operation on
//! a logarithmic axis (so that 70 and 30 000 both read), one block per operation group with
//! its paravirtual and trapping operations next to each other, one bar per vendor. Every bar
//! carries its figures as text (instructions and exits per operation), so the chart reads
//! without the axis too.
//!
//! The trapped UART is measured per byte and the console calls per 80-byte line, so the
//! chart adds a derived bar, 80 times the byte, for the line the other two print.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::measurement::{Figure, Measurement, sorted};

const WIDTH: f64 = 1000.0;
/// Left edge of the bars (operation names go to its left).
const PLOT_LEFT: f64 = 250.0;
/// Right edge of the axis (labels may run beyond, into the margin).
const PLOT_RIGHT: f64 = 800.0;
const TOP: f64 = 96.0;
const BAR_HEIGHT: f64 = 10.0;
const BAR_GAP: f64 = 2.0;
const ROW_GAP: f64 = 8.0;
const GROUP_HEADING: f64 = 24.0;
const FONT: &str = "sans-serif";

/// Bars computed from a measured one: (measured operation, name, factor).
const DERIVED: &[(&str, &str, u64)] = &[("uart_byte", "uart_byte x 80 (a line)", 80)];

/// What the figures mean, under the chart.
const FOOTNOTES: &[&str] = &[
    "uart_byte: one byte; console_line_*: one 80-byte line; multicall_n and calls_n: a batch of n version calls, in one exit or n.",
    "timer_*: set a timer 50 us ahead and wait for its interrupt; the wait itself (blocked or halted) is not counted.",
];

/// `measurements` with the [`DERIVED`] bars inserted after their sources.
fn with_derived(measurements: &[Measurement]) -> Vec<Measurement> {
    let mut out = Vec::with_capacity(measurements.len());
    for m in measurements {
        out.push(m.clone());
    }
    for &(source, name, factor) in DERIVED {
        let derived: Vec<Measurement> = measurements
            .iter()
            .filter(|m| m.op == source && m.skipped.is_none())
            .map(|m| Measurement {
                op: name.to_string(),
                instructions: m.instructions.map(|f| Figure(f.0 * factor)),
                exits: m.exits.map(|f| Figure(f.0 * factor)),
                blocked: m.blocked.map(|f| Figure(f.0 * factor)),
                iterations: m.iterations / factor,
                ..m.clone()
            })
            .collect();
        // Right after the source's first row: `sorted` orders operations by first appearance.
        if let Some(at) = out.iter().position(|m| m.op == source) {
            for (offset, row) in derived.into_iter().enumerate() {
                out.insert(at + 1 + offset, row);
            }
        }
    }
    out
}

/// Bar colours: paravirtual blue, trapping orange; darker for AMD, lighter for Intel.
fn colour(path: &str, vendor: &str) -> &'static str {
    match (path, vendor == "amd") {
        ("trap", true) => "#d9661f",
        ("trap", false) => "#f2a561",
        (_, true) => "#1f5fa8",
        (_, false) => "#6fa3dc",
    }
}

/// 29541.37 as `29 541`, 71.5 as `71.5`: thin-space thousands, one decimal below 100.
fn instructions_label(figure: Figure) -> String {
    let value = figure.as_f64();
    if value < 100.0 {
        let text = format!("{value:.1}");
        return text.strip_suffix(".0").map_or(text.clone(), str::to_string);
    }
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push('\u{2009}');
        }
        out.push(digit);
    }
    out
}

/// `1 exit`, `0.04 exits`, `32 exits`; `exits n/a` without `stats_op`.
fn exits_label(exits: Option<Figure>) -> String {
    match exits {
        None => "exits n/a".to_string(),
        Some(Figure(100)) => "1 exit".to_string(),
        Some(figure) if figure.0 % 100 == 0 => format!("{} exits", figure.0 / 100),
        Some(figure) => format!("{figure} exits"),
    }
}

/// The logarithmic axis: decades from `low` to `high` (powers of ten).
struct Axis {
    low_exp: i32,
    high_exp: i32,
}

impl Axis {
    fn covering(values: impl Iterator<Item = f64>) -> Axis {
        let (mut low, mut high) = (f64::MAX, f64::MIN);
        for value in values.filter(|v| *v > 0.0) {
            low = low.min(value);
            high = high.max(value);
        }
        if low > high {
            return Axis {
                low_exp: 0,
                high_exp: 3,
            };
        }
        let low_exp = low.log10().floor() as i32;
        let high_exp = (high.log10().ceil() as i32).max(low_exp + 1);
        Axis { low_exp, high_exp }
    }

    /// x of `value` (clamped into the axis).
    fn x(&self, value: f64) -> f64 {
        let exp = value.max(10f64.powi(self.low_exp)).log10();
        let span = f64::from(self.high_exp - self.low_exp);
        PLOT_LEFT + (exp - f64::from(self.low_exp)) / span * (PLOT_RIGHT - PLOT_LEFT)
    }
}

fn decade_label(exp: i32) -> String {
    match exp {
        e if e < 3 => format!("{}", 10u64.pow(e.max(0) as u32)),
        e if e < 6 => format!("{}k", 10u64.pow((e - 3) as u32)),
        e => format!("{}M", 10u64.pow((e - 6) as u32)),
    }
}

/// `#rrggbb` as a colour.
fn rgb(hex: &str) -> RGBColor {
    let channel = |at: usize| u8::from_str_radix(hex.get(at..at + 2).unwrap_or("00"), 16);
    RGBColor(
        channel(1).unwrap_or(0),
        channel(3).unwrap_or(0),
        channel(5).unwrap_or(0),
    )
}

/// Text of `size` pixels in `colour`, anchored at `h` (left, centre or right) on its baseline.
fn text_style(size: f64, colour: &str, h: HPos) -> TextStyle<'static> {
    // The SVG backend writes font-size as size / 1.24 (its font box to em): undo that.
    TextStyle {
        font: (FONT, size * 1.24).into_font(),
        color: rgb(colour).to_backend_color(),
        pos: Pos::new(h, VPos::Bottom),
    }
}

/// A pixel position.
fn at(x: f64, y: f64) -> (i32, i32) {
    (x.round() as i32, y.round() as i32)
}

/// The chart of `measurements` (any number of vendors; the order is the guest's), drawn by
/// plotters' SVG backend (elements, escaping); the layout and the log axis are ours.
pub fn svg(measurements: &[Measurement]) -> String {
    let measurements = with_derived(measurements);
    let rows = sorted(&measurements);
    let axis = Axis::covering(
        rows.iter()
            .filter_map(|m| m.instructions)
            .map(Figure::as_f64),
    );
    let mut vendors: Vec<&str> = Vec::new();
    let mut groups: Vec<&str> = Vec::new();
    let mut ops: Vec<&Measurement> = Vec::new();
    for m in &rows {
        if !vendors.contains(&m.vendor.as_str()) {
            vendors.push(&m.vendor);
        }
        if !groups.contains(&m.group.as_str()) {
            groups.push(&m.group);
        }
        if !ops.iter().any(|o| o.op == m.op) {
            ops.push(m);
        }
    }
    let row_height = vendors.len().max(1) as f64 * (BAR_HEIGHT + BAR_GAP) + ROW_GAP;
    let body_height: f64 = groups
        .iter()
        .map(|g| {
            GROUP_HEADING + 4.0 + ops.iter().filter(|o| o.group == *g).count() as f64 * row_height
        })
        .sum();
    let axis_bottom = TOP + body_height + 6.0;
    let height = axis_bottom + 36.0 + 15.0 * FOOTNOTES.len() as f64;

    let mut out = String::new();
    let drawn = draw(
        &mut out,
        (WIDTH, height),
        &Layout {
            rows: &rows,
            axis: &axis,
            vendors: &vendors,
            groups: &groups,
            ops: &ops,
            row_height,
            axis_bottom,
        },
    );
    if let Err(err) = drawn {
        return format!("<!-- plotters could not draw the chart: {err} -->\n");
    }
    out
}

/// What [`draw`] lays out.
struct Layout<'a> {
    rows: &'a [&'a Measurement],
    axis: &'a Axis,
    vendors: &'a [&'a str],
    groups: &'a [&'a str],
    ops: &'a [&'a Measurement],
    row_height: f64,
    axis_bottom: f64,
}

type Drawn = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw(out: &mut String, (width, height): (f64, f64), layout: &Layout<'_>) -> Drawn {
    let root =
        SVGBackend::with_string(out, (width as u32, height.ceil() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let text = |text: &str, x: f64, y: f64, style: &TextStyle<'static>| {
        root.draw(&Text::new(text.to_string(), at(x, y), style.clone()))
    };
    let left = |size: f64, colour: &str| text_style(size, colour, HPos::Left);
    text(
        "Lamina: cost per operation, paravirtual vs trapping",
        12.0,
        24.0,
        &left(17.0, "#000000"),
    )?;
    text(
        "Instructions per operation, guest and hypervisor together (TSC under QEMU -icount shift=0 for AMD-V, Bochs for VT-x), logarithmic axis; exits per operation in the labels.",
        12.0,
        44.0,
        &left(11.0, "#444444"),
    )?;
    // Legend.
    let mut legend_x = 12.0;
    for vendor in layout.vendors {
        for (path, name) in [("pv", "paravirtual"), ("trap", "trapping")] {
            root.draw(&Rectangle::new(
                [at(legend_x, 56.0), at(legend_x + 14.0, 66.0)],
                rgb(colour(path, vendor)).filled(),
            ))?;
            text(
                &format!("{vendor} {name}"),
                legend_x + 18.0,
                65.0,
                &left(11.0, "#000000"),
            )?;
            legend_x += 150.0;
        }
    }
    // Axis: a gridline and a label per decade, top and bottom.
    let axis = layout.axis;
    let grid = rgb("#dddddd");
    for exp in axis.low_exp..=axis.high_exp {
        let x = axis.x(10f64.powi(exp));
        root.draw(&PathElement::new(
            vec![at(x, TOP), at(x, layout.axis_bottom)],
            grid.stroke_width(1),
        ))?;
        for label_y in [TOP - 4.0, layout.axis_bottom + 14.0] {
            text(
                &decade_label(exp),
                x,
                label_y,
                &text_style(10.0, "#555555", HPos::Center),
            )?;
        }
    }
    text(
        "instructions / operation",
        WIDTH - 12.0,
        layout.axis_bottom + 14.0,
        &text_style(10.0, "#555555", HPos::Right),
    )?;
    for (index, note) in FOOTNOTES.iter().enumerate() {
        text(
            note,
            12.0,
            layout.axis_bottom + 36.0 + 15.0 * index as f64,
            &left(10.5, "#444444"),
        )?;
    }
    // The groups, their operations and a bar per vendor.
    let mut y = TOP;
    for group in layout.groups {
        y += GROUP_HEADING;
        text(group, 12.0, y - 7.0, &left(14.0, "#000000"))?;
        root.draw(&PathElement::new(
            vec![at(12.0, y), at(WIDTH - 12.0, y)],
            rgb("#999999").stroke_width(1),
        ))?;
        y += 4.0;
        for op in layout.ops.iter().filter(|o| o.group == *group) {
            let label_y = y + layout.row_height / 2.0 - ROW_GAP / 2.0 + 4.0;
            text(
                &format!("{} {}", op.op, op.path),
                PLOT_LEFT - 8.0,
                label_y,
                &text_style(12.0, "#000000", HPos::Right),
            )?;
            for (index, vendor) in layout.vendors.iter().enumerate() {
                let bar_y = y + index as f64 * (BAR_HEIGHT + BAR_GAP);
                let text_y = bar_y + BAR_HEIGHT - 1.5;
                let Some(m) = layout
                    .rows
                    .iter()
                    .find(|m| m.op == op.op && m.vendor == *vendor)
                else {
                    continue;
                };
                match m.instructions.filter(|_| m.skipped.is_none()) {
                    None => {
                        let why = m.skipped.as_deref().unwrap_or("no figure");
                        text(
                            &format!("{vendor}: n/a ({why})"),
                            PLOT_LEFT + 4.0,
                            text_y,
                            &left(10.0, "#777777"),
                        )?;
                    }
                    Some(instructions) => {
                        let end = axis.x(instructions.as_f64()).max(PLOT_LEFT + 1.0);
                        root.draw(&Rectangle::new(
                            [at(PLOT_LEFT, bar_y), at(end, bar_y + BAR_HEIGHT)],
                            rgb(colour(&m.path, vendor)).filled(),
                        ))?;
                        text(
                            &format!(
                                "{} \u{b7} {} \u{b7} {vendor}",
                                instructions_label(instructions),
                                exits_label(m.exits)
                            ),
                            end + 4.0,
                            text_y,
                            &left(10.0, "#000000"),
                        )?;
                    }
                }
            }
            y += layout.row_height;
        }
    }
    root.present()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(op: &str, group: &str, path: &str, vendor: &str, instructions: u64) -> Measurement {
        Measurement {
            op: op.to_string(),
            group: group.to_string(),
            path: path.to_string(),
            vendor: vendor.to_string(),
            iterations: 100,
            instructions: Some(Figure(instructions)),
            exits: Some(Figure(100)),
            blocked: None,
            skipped: None,
        }
    }

    fn sample() -> Vec<Measurement> {
        let mut skipped = m("event_pingpong", "pingpong", "pv", "amd", 0);
        skipped.instructions = None;
        skipped.exits = None;
        skipped.skipped = Some("needs-interdomain-events".to_string());
        vec![
            m("null_hypercall", "hypercall", "pv", "amd", 7_000),
            m("null_hypercall", "hypercall", "pv", "intel", 8_000),
            m("uart_byte", "console", "trap", "amd", 3_000_000),
            m("uart_byte", "console", "trap", "intel", 2_500_000),
            m("pvclock_read", "time", "pv", "amd", 5_210),
            skipped,
        ]
    }

    #[test]
    fn the_chart_is_one_well_formed_svg_with_a_bar_per_figure() {
        let svg = svg(&sample());
        assert!(svg.starts_with("<svg "), "{svg}");
        assert!(svg.contains("xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<svg").count(), 1);
        // Every element is closed: a crude but effective balance check.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert_eq!(
            svg.matches("<rect x=\"250\"").count(),
            7,
            "one bar per measured figure, and two for the UART line"
        );
        assert!(svg.contains("\nuart_byte x 80 (a line) trap\n"));
        for group in ["hypercall", "console", "time", "pingpong"] {
            assert!(svg.contains(&format!("\n{group}\n</text>")), "{group}");
        }
        assert!(svg.contains("amd: n/a (needs-interdomain-events)"));
        assert!(
            svg.contains("30\u{2009}000 \u{b7} 1 exit \u{b7} amd"),
            "30000 labelled"
        );
        assert!(svg.contains("\n70 \u{b7} 1 exit \u{b7} amd"), "70 labelled");
    }

    #[test]
    fn names_are_escaped() {
        let mut odd = sample();
        odd[0].op = "a<b&\"c\"".to_string();
        let svg = svg(&odd);
        assert!(svg.contains("a&lt;b&amp;&quot;c&quot; pv"), "{svg}");
    }

    #[test]
    fn derived_bars_follow_their_source_times_the_factor() {
        let rows = with_derived(&sample());
        let names: Vec<&str> = rows.iter().map(|m| m.op.as_str()).collect();
        assert_eq!(
            names[2..6],
            [
                "uart_byte",
                "uart_byte x 80 (a line)",
                "uart_byte x 80 (a line)",
                "uart_byte"
            ]
        );
        assert_eq!(rows[3].instructions, Some(Figure(240_000_000)));
        assert_eq!(rows[3].exits, Some(Figure(8_000)));
        assert_eq!(rows[3].vendor, "amd");
        assert_eq!(rows[4].vendor, "intel");
        let order: Vec<&str> = sorted(&rows).iter().map(|m| m.op.as_str()).collect();
        assert_eq!(
            order[2..6],
            [
                "uart_byte",
                "uart_byte",
                "uart_byte x 80 (a line)",
                "uart_byte x 80 (a line)"
            ]
        );
        assert_eq!(rows.len(), sample().len() + 2);
    }

    #[test]
    fn the_axis_is_logarithmic_and_covers_every_value() {
        let axis = Axis::covering([70.0, 30_000.0].into_iter());
        assert_eq!((axis.low_exp, axis.high_exp), (1, 5));
        let x10 = axis.x(10.0);
        let x100 = axis.x(100.0);
        let x1000 = axis.x(1000.0);
        assert!((x10 - PLOT_LEFT).abs() < 1e-9);
        assert!(
            ((x100 - x10) - (x1000 - x100)).abs() < 1e-9,
            "equal decades"
        );
        assert!((axis.x(100_000.0) - PLOT_RIGHT).abs() < 1e-9);
        assert!(axis.x(70.0) > x10 && axis.x(70.0) < x100);
        let empty = Axis::covering(std::iter::empty());
        assert!(empty.high_exp > empty.low_exp);
    }

    #[test]
    fn labels_read_well() {
        assert_eq!(instructions_label(Figure(7_000)), "70");
        assert_eq!(instructions_label(Figure(7_150)), "71.5");
        assert_eq!(instructions_label(Figure(2_954_137)), "29\u{2009}541");
        assert_eq!(instructions_label(Figure(12_345_600)), "123\u{2009}456");
        assert_eq!(exits_label(Some(Figure(100))), "1 exit");
        assert_eq!(exits_label(Some(Figure(3_200))), "32 exits");
        assert_eq!(exits_label(Some(Figure(4))), "0.04 exits");
        assert_eq!(exits_label(None), "exits n/a");
        assert_eq!(decade_label(1), "10");
        assert_eq!(decade_label(4), "10k");
        assert_eq!(decade_label(6), "1M");
    }
}
