//! Self-contained HTML pages: everything (style, pictures as base64 data URIs) is inside the
//! one file, so a report can be mailed or archived and still shows everything.

use std::collections::BTreeMap;

use crate::html::{base64, escape};

/// Colours of the page. The header colour and the state colours are also what the browser
/// test looks for in a screenshot, so they are solid and unique on the page.
pub const HEADER: [u8; 3] = [0x1f, 0x3a, 0x5f];
pub const GOOD: [u8; 3] = [0x1a, 0x7f, 0x37];
pub const BAD: [u8; 3] = [0xc0, 0x1c, 0x28];

fn hex(c: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// How a finding reads: fine or a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Good,
    Bad,
}

/// A page under construction.
pub struct Page {
    body: String,
}

impl Page {
    pub fn new(title: &str) -> Self {
        Self {
            body: format!("<h1>{}</h1>\n", escape(title)),
        }
    }

    pub fn heading(&mut self, text: &str) {
        self.body.push_str(&format!("<h2>{}</h2>\n", escape(text)));
    }

    pub fn paragraph(&mut self, text: &str) {
        self.body.push_str(&format!("<p>{}</p>\n", escape(text)));
    }

    /// A table of plain-text cells; a cell may carry a [`State`] that colours it.
    pub fn table(&mut self, headers: &[&str], rows: &[Vec<Cell>]) {
        let mut t = String::from("<table>\n<tr>");
        for h in headers {
            t.push_str(&format!("<th>{}</th>", escape(h)));
        }
        t.push_str("</tr>\n");
        for row in rows {
            t.push_str("<tr>");
            for cell in row {
                match cell.state {
                    Some(s) => t.push_str(&format!(
                        "<td><span class=\"{}\">{}</span></td>",
                        class(s),
                        escape(&cell.text)
                    )),
                    None => t.push_str(&format!("<td>{}</td>", escape(&cell.text))),
                }
            }
            t.push_str("</tr>\n");
        }
        t.push_str("</table>\n");
        self.body.push_str(&t);
    }

    /// A PNG embedded as a data URI, with a caption.
    pub fn image(&mut self, png: &[u8], caption: &str) {
        self.body.push_str(&format!(
            "<figure><img alt=\"{c}\" src=\"data:image/png;base64,{}\"><figcaption>{c}</figcaption></figure>\n",
            base64(png),
            c = escape(caption)
        ));
    }

    pub fn link(&mut self, href: &str, text: &str) {
        self.body.push_str(&format!(
            "<p><a href=\"{}\">{}</a></p>\n",
            escape(href),
            escape(text)
        ));
    }

    pub fn preformatted(&mut self, text: &str) {
        self.body
            .push_str(&format!("<pre>{}</pre>\n", escape(text.trim_end())));
    }

    /// Key/value pairs (a LoRA's metadata); JSON values are pretty-printed.
    pub fn key_values(&mut self, map: &BTreeMap<String, String>) {
        let rows: Vec<Vec<Cell>> = map
            .iter()
            .map(|(k, v)| {
                let pretty = serde_json::from_str::<serde_json::Value>(v)
                    .ok()
                    .filter(|j| j.is_object() || j.is_array())
                    .and_then(|j| serde_json::to_string_pretty(&j).ok())
                    .unwrap_or_else(|| v.clone());
                vec![Cell::plain(k), Cell::plain(&pretty)]
            })
            .collect();
        self.table(&["key", "value"], &rows);
    }

    /// The finished document.
    pub fn finish(self, title: &str) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{}</style>\n</head>\n<body>\n{}</body>\n</html>\n",
            escape(title),
            style(),
            self.body
        )
    }
}

fn class(s: State) -> &'static str {
    match s {
        State::Good => "good",
        State::Bad => "bad",
    }
}

fn style() -> String {
    format!(
        "body{{font-family:sans-serif;margin:16px;color:#222;background:#fff}}\
         table{{border-collapse:collapse;margin:8px 0 16px}}\
         th{{background:{h};color:#fff;padding:6px 10px;text-align:left}}\
         td{{border:1px solid #ccc;padding:4px 10px;vertical-align:top;white-space:pre-wrap}}\
         td span{{display:inline-block;padding:2px 8px;color:#fff;border-radius:3px}}\
         .good{{background:{g}}}.bad{{background:{b}}}\
         figure{{margin:8px 0 20px}}img{{image-rendering:pixelated;max-width:100%}}\
         pre{{background:#f4f4f4;padding:8px;overflow:auto}}",
        h = hex(HEADER),
        g = hex(GOOD),
        b = hex(BAD)
    )
}

/// One table cell: text, optionally coloured by a state.
#[derive(Debug, Clone)]
pub struct Cell {
    pub text: String,
    pub state: Option<State>,
}

impl Cell {
    pub fn plain(text: &str) -> Self {
        Self {
            text: text.to_string(),
            state: None,
        }
    }

    pub fn state(text: &str, state: State) -> Self {
        Self {
            text: text.to_string(),
            state: Some(state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_everywhere() {
        let mut p = Page::new("<t>");
        p.table(&["a&b"], &[vec![Cell::state("<x>", State::Bad)]]);
        p.preformatted("\"q\"");
        let html = p.finish("<t>");
        assert!(!html.contains("<t>") && !html.contains("<x>"));
        assert!(
            html.contains("&lt;x&gt;")
                && html.contains("a&amp;b")
                && html.contains("&quot;q&quot;")
        );
    }
}
