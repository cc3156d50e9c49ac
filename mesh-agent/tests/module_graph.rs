//! The agent's top-level modules form a layered graph: no module reaches,
//! through `crate::` paths, a module that reaches back to it. Read from the
//! sources, so a new cycle fails `cargo test` rather than a review.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("source directory reads") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its test module (tests
/// may use anything).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names: `crate::a::…` and the first
/// segments inside `use crate::{a::…, b, …}`.
fn named_modules(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group only.
            let mut depth = 0usize;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        named.extend(first_segment(&item, modules));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            named.extend(first_segment(&item, modules));
        } else {
            named.extend(first_segment(rest, modules));
        }
    }
    named
}

fn first_segment(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let name: String = path
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    modules.contains(&name).then_some(name)
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: BTreeSet<String> = fs::read_dir(&src)
        .expect("src reads")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let stem = path.file_stem()?.to_str()?.to_owned();
            (path.is_dir() || path.extension().is_some_and(|e| e == "rs")).then_some(stem)
        })
        .filter(|name| name != "lib" && name != "main")
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative.components().next().expect("a component");
        let module = Path::new(first.as_os_str())
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 name")
            .to_owned();
        if !modules.contains(&module) {
            continue;
        }
        let text = fs::read_to_string(&file).expect("source reads");
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(
            named_modules(&code(&text), &modules)
                .into_iter()
                .filter(|m| *m != module),
        );
    }
    graph
}

fn reaches(graph: &Graph, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_owned()];
    while let Some(module) = stack.pop() {
        for next in graph.get(&module).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.clone()) {
                stack.push(next.clone());
            }
        }
    }
    false
}

#[test]
fn top_level_modules_have_no_import_cycles() {
    let graph = graph();
    assert!(graph.len() > 10, "the parser found the modules: {graph:?}");
    let cycles: Vec<String> = graph
        .iter()
        .flat_map(|(module, uses)| {
            uses.iter()
                .filter(|used| reaches(&graph, used, module))
                .map(move |used| format!("{module} -> {used} -> … -> {module}"))
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn the_parser_sees_grouped_and_plain_paths() {
    let modules: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
    let code = "use crate::{a::{x, y}, b};\nfn f() { crate::c::g(); }";
    let named = named_modules(code, &modules);
    assert_eq!(named, ["a", "b", "c"].map(String::from).into());
}
