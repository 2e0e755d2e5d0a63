//! `banger-agent`: see the library docs.

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("banger-agent {} (protocol v{})", env!("CARGO_PKG_VERSION"), banger_agent_proto::PROTO_VERSION);
        return;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("banger-agent: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(banger_agent::transport::run()) {
        eprintln!("banger-agent: {e}");
        std::process::exit(1);
    }
}
