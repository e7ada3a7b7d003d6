//! What a group commit costs with and without the shim: commits of `rows` message-like rows
//! (the columns and indexes of switchboard's `messages`) on a WAL database with
//! `synchronous = FULL`, through SQLite's default VFS and through this one, taking turns
//! round by round so that the machine's drift falls on both alike.
//!
//! `cargo run --release -p switchboard-walvfs --example commits -- [rows] [commits] [rounds]`
//! (defaults 20, 2000, 6). Prints the wall and CPU time of the committing thread per commit.

use std::time::Instant;

use rusqlite::{params, Connection, OpenFlags};

fn thread_cpu_ns() -> u64 {
    // The first field of schedstat: time spent running, in nanoseconds.
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (wall µs, CPU µs) per commit.
fn run(dir: &std::path::Path, vfs: Option<&str>, rows: usize, commits: usize) -> (f64, f64) {
    let path = dir.join(format!("{}.db", vfs.unwrap_or("default")));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(dir.join(format!("{}.db-wal", vfs.unwrap_or("default"))));
    let conn = match vfs {
        Some(v) => Connection::open_with_flags_and_vfs(&path, OpenFlags::default(), v),
        None => Connection::open(&path),
    }
    .expect("open");
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE messages (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
             account_id TEXT NOT NULL, conversation_id TEXT NOT NULL, visitor_id TEXT NOT NULL,
             type TEXT NOT NULL, text TEXT NOT NULL, agent_name TEXT, created_at INTEGER NOT NULL);
         CREATE INDEX messages_visitor ON messages (account_id, visitor_id, seq);
         CREATE INDEX messages_account_seq ON messages (account_id, seq);",
    )
    .expect("schema");
    let mut stmt = conn
        .prepare(
            "INSERT INTO messages (seq, id, account_id, conversation_id, visitor_id, type, text, \
             agent_name, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'agent', ?6, 'Liz', ?7)",
        )
        .expect("prepare");
    let mut seq = 0i64;
    let started = Instant::now();
    let cpu = thread_cpu_ns();
    for _ in 0..commits {
        conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
        for _ in 0..rows {
            seq += 1;
            stmt.execute(params![
                seq,
                format!("{seq:0>17}"),
                "acct0000000000001",
                "conv0000000000001",
                "kZMvWhf8npAu3H6qd57w2Hv6nh6rnxvg",
                "Hello! How can I help you?",
                seq
            ])
            .expect("insert");
        }
        conn.execute_batch("COMMIT").expect("commit");
    }
    let wall = started.elapsed().as_secs_f64() * 1e6 / commits as f64;
    let cpu = (thread_cpu_ns() - cpu) as f64 / 1e3 / commits as f64;
    (wall, cpu)
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("a number"));
    let rows = args.next().unwrap_or(20);
    let commits = args.next().unwrap_or(2000);
    let rounds = args.next().unwrap_or(6);
    switchboard_walvfs::register().expect("register");
    // In the working directory: /tmp is a tmpfs on many machines, where fsync costs nothing.
    let dir = tempfile::tempdir_in(std::env::current_dir().expect("cwd")).expect("tempdir");
    println!("{rows} rows per commit, {commits} commits per round");
    let (mut ratios_wall, mut ratios_cpu) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        // Taking turns going first.
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        let mut out = [(0.0, 0.0); 2];
        for shim in order {
            let vfs = shim.then_some(switchboard_walvfs::NAME);
            out[usize::from(shim)] = run(dir.path(), vfs, rows, commits);
        }
        let [(dw, dc), (sw, sc)] = out;
        println!(
            "round {round}: default VFS {dw:7.1} µs wall {dc:6.1} µs CPU per commit | \
             shim {sw:7.1} µs wall {sc:6.1} µs CPU | shim/default wall {:.0}% CPU {:.0}%",
            sw / dw * 100.0,
            sc / dc * 100.0
        );
        ratios_wall.push(sw / dw);
        ratios_cpu.push(sc / dc);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 100.0
    };
    println!(
        "median shim/default: wall {:.0}%, CPU {:.0}%",
        median(&mut ratios_wall),
        median(&mut ratios_cpu)
    );
}
