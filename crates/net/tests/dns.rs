//! The `.vm` DNS server, queried on loopback with hickory's resolver over
//! UDP and TCP.

use banger_net::dns::{DnsRecords, DnsServer};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

fn resolver(server: SocketAddr, tcp: bool) -> TokioResolver {
    let mut conn = if tcp {
        ConnectionConfig::tcp()
    } else {
        ConnectionConfig::udp()
    };
    conn.port = server.port();
    let mut ns = NameServerConfig::udp(server.ip());
    ns.connections = vec![conn];
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.attempts = 1;
    opts.timeout = Duration::from_secs(2);
    TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .expect("resolver")
}

fn response_code(e: &NetError) -> Option<ResponseCode> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code, .. })) => {
            Some(*response_code)
        }
        NetError::Dns(DnsError::ResponseCode(code)) => Some(*code),
        _ => None,
    }
}

async fn a_records(r: &TokioResolver, name: &str) -> Result<Vec<Ipv4Addr>, NetError> {
    let l = r.lookup(name, RecordType::A).await?;
    Ok(l.answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

async fn start() -> (DnsServer, DnsRecords) {
    let records = DnsRecords::new();
    let server = DnsServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), records.clone())
        .await
        .expect("start DNS server");
    (server, records)
}

#[tokio::test]
async fn answers_known_names_over_udp_and_tcp() {
    let (server, records) = start().await;
    let addr = server.local_addr();
    records
        .set("web", Ipv4Addr::new(172, 16, 0, 2))
        .expect("set");
    for tcp in [false, true] {
        let r = resolver(addr, tcp);
        assert_eq!(
            a_records(&r, "web.vm.").await.expect("A"),
            vec![Ipv4Addr::new(172, 16, 0, 2)],
            "tcp={tcp}"
        );
        // Names are case-insensitive.
        assert_eq!(
            a_records(&r, "WeB.Vm.").await.expect("A"),
            vec![Ipv4Addr::new(172, 16, 0, 2)]
        );
    }
    // An update is visible at once.
    records
        .set("web", Ipv4Addr::new(172, 16, 0, 9))
        .expect("set");
    let r = resolver(addr, false);
    assert_eq!(
        a_records(&r, "web.vm.").await.expect("A"),
        vec![Ipv4Addr::new(172, 16, 0, 9)]
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn nxdomain_after_remove_with_the_zone_soa() {
    let (server, records) = start().await;
    let r = resolver(server.local_addr(), false);
    records
        .set("db", Ipv4Addr::new(172, 16, 0, 3))
        .expect("set");
    assert!(a_records(&r, "db.vm.").await.is_ok());
    records.remove("db");
    let e = a_records(&r, "db.vm.").await.expect_err("removed");
    assert!(e.is_nx_domain(), "{e:?}");
    let NetError::Dns(DnsError::NoRecordsFound(nr)) = &e else {
        panic!("{e:?}")
    };
    let soa = nr.soa.as_ref().expect("negative answer carries the SOA");
    assert_eq!(soa.name.to_string(), "vm.");
    assert_eq!(soa.data.serial, records.serial());
    assert_eq!(soa.data.minimum, banger_net::dns::TTL);

    // Unknown names and deeper names are NXDOMAIN too.
    for n in ["nope.vm.", "a.b.vm."] {
        let e = a_records(&r, n).await.expect_err(n);
        assert!(e.is_nx_domain(), "{n}: {e:?}");
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn refuses_names_outside_the_zone() {
    let (server, records) = start().await;
    records
        .set("web", Ipv4Addr::new(172, 16, 0, 2))
        .expect("set");
    for tcp in [false, true] {
        let r = resolver(server.local_addr(), tcp);
        for n in ["example.com.", "web.vm.example.com.", "vmx."] {
            let e = a_records(&r, n).await.expect_err(n);
            assert_eq!(response_code(&e), Some(ResponseCode::Refused), "{n}: {e:?}");
        }
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn zone_apex_has_an_soa() {
    let (server, records) = start().await;
    records.set("x", Ipv4Addr::new(172, 16, 0, 2)).expect("set");
    let r = resolver(server.local_addr(), false);
    let l = r.lookup("vm.", RecordType::SOA).await.expect("SOA");
    let soa = l
        .answers()
        .iter()
        .find_map(|rec| match &rec.data {
            RData::SOA(s) => Some(s.clone()),
            _ => None,
        })
        .expect("SOA record");
    assert_eq!(soa.serial, records.serial());
    assert_eq!(soa.mname.to_string(), "localhost.");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn binding_a_busy_address_is_a_clear_error() {
    let (server, _) = start().await;
    let e = DnsServer::start(server.local_addr(), DnsRecords::new())
        .await
        .err()
        .expect("address in use");
    let msg = e.to_string();
    assert!(msg.contains(&server.local_addr().to_string()), "{msg}");
    assert!(msg.contains("binding UDP"), "{msg}");
    server.shutdown().await.expect("shutdown");
}

async fn raw_query(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    sock.send_to(&m.to_vec().expect("encode"), server)
        .await
        .expect("send");
    let mut buf = [0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .expect("answer in time")
        .expect("recv");
    Message::from_vec(&buf[..n]).expect("decode")
}

#[tokio::test]
async fn answers_are_authoritative_and_never_recursive() {
    let (server, records) = start().await;
    records
        .set("web", Ipv4Addr::new(172, 16, 0, 2))
        .expect("set");
    let addr = server.local_addr();

    let r = raw_query(addr, "web.vm.", RecordType::A).await;
    assert_eq!(r.metadata.id, 4242);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert!(!r.metadata.recursion_available);
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].ttl, banger_net::dns::TTL);

    // Known name, other type: NODATA with the SOA.
    let r = raw_query(addr, "web.vm.", RecordType::AAAA).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    assert_eq!(r.authorities.len(), 1);
    assert_eq!(r.authorities[0].record_type(), RecordType::SOA);

    let r = raw_query(addr, "example.com.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert!(!r.metadata.authoritative);
    assert!(r.answers.is_empty() && r.authorities.is_empty());
    server.shutdown().await.expect("shutdown");
}
