//! Finds the line of a field in YAML text, by path (`services[1].ports[0]`),
//! so errors found after parsing (a duplicate VIP, an unknown subset) can
//! name the line too. serde only knows lines while it parses.

use yaml_rust2::{
    Event,
    parser::{MarkedEventReceiver, Parser},
    scanner::Marker,
};

/// The 1-based line where the value at `path` starts, if it exists.
pub fn line_of(text: &str, path: &str) -> Option<usize> {
    let target = parse_path(path)?;
    let mut events = Collect::default();
    Parser::new_from_str(text).load(&mut events, false).ok()?;
    walk(&events.0, &target)
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Option<Vec<Segment>> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_owned()));
        }
        while !rest.is_empty() {
            let (index, after) = rest.split_once(']')?;
            segments.push(Segment::Index(index.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    Some(segments)
}

#[derive(Default)]
struct Collect(Vec<(Event, Marker)>);

impl MarkedEventReceiver for Collect {
    fn on_event(&mut self, event: Event, mark: Marker) {
        self.0.push((event, mark));
    }
}

enum Frame {
    Mapping { key: Option<String> },
    Sequence { next: usize },
}

/// Replays the events, tracking the path of each node, until `target`.
fn walk(events: &[(Event, Marker)], target: &[Segment]) -> Option<usize> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut path: Vec<Segment> = Vec::new();
    for (event, mark) in events {
        let starts_node = matches!(
            event,
            Event::Scalar(..)
                | Event::SequenceStart(..)
                | Event::MappingStart(..)
                | Event::Alias(..)
        );
        if starts_node {
            // A scalar where a mapping expects a key is the key, not a node.
            if let (Event::Scalar(key, ..), Some(Frame::Mapping { key: slot @ None })) =
                (event, stack.last_mut())
            {
                *slot = Some(key.clone());
                continue;
            }
            let segment = match stack.last_mut() {
                Some(Frame::Mapping { key }) => key.take().map(Segment::Key),
                Some(Frame::Sequence { next }) => {
                    *next += 1;
                    Some(Segment::Index(*next - 1))
                }
                None => None,
            };
            if let Some(segment) = segment.clone() {
                path.push(segment);
            }
            if path == target {
                return Some(mark.line());
            }
            match event {
                Event::MappingStart(..) => stack.push(Frame::Mapping { key: None }),
                Event::SequenceStart(..) => stack.push(Frame::Sequence { next: 0 }),
                // A leaf: its segment ends here.
                _ => {
                    if segment.is_some() {
                        path.pop();
                    }
                }
            }
            continue;
        }
        if matches!(event, Event::MappingEnd | Event::SequenceEnd) {
            stack.pop();
            // The container's own segment ends with it.
            if !stack.is_empty() {
                path.pop();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "node: { name: n1 }
services:
  - name: a
    ports: [{ port: 80 }]
  - name: b
    vip: 10.0.0.1
    ports:
      - port: 80
      - { port: 81 }
";

    #[test]
    fn finds_block_and_flow_fields() {
        assert_eq!(line_of(TEXT, "node"), Some(1));
        assert_eq!(line_of(TEXT, "node.name"), Some(1));
        assert_eq!(line_of(TEXT, "services[0].ports[0]"), Some(4));
        assert_eq!(line_of(TEXT, "services[1]"), Some(5));
        assert_eq!(line_of(TEXT, "services[1].vip"), Some(6));
        assert_eq!(line_of(TEXT, "services[1].ports[1]"), Some(9));
        assert_eq!(line_of(TEXT, "services[2]"), None);
    }
}
