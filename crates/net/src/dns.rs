//! An authoritative DNS server for the `.vm` zone.
//!
//! `<name>.vm` resolves to the guest address of VM `<name>` from a shared
//! map the daemon updates ([`DnsRecords`]). Unknown names in the zone get
//! NXDOMAIN, anything outside it REFUSED: the server never recurses, so it
//! cannot be used to reach other resolvers. Negative answers carry the zone's
//! SOA, whose serial moves with every change of the map.

use hickory_proto::op::{Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};

/// Where the server listens unless told otherwise.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 42069);

/// The zone, without the trailing dot.
pub const ZONE: &str = "vm";

/// TTL of A records and of negative answers: VMs come and go, so resolvers
/// should not hold on to either for long.
pub const TTL: u32 = 5;

const TCP_TIMEOUT: Duration = Duration::from_secs(5);

/// A DNS server or record problem.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "{0:?} is not a valid VM name for DNS (a-z, 0-9 and '-', at most 63 characters, not starting or ending with '-')"
    )]
    BadName(String),
    #[error(
        "DNS server: binding {proto} {addr}: {source} (is another bangerd running? set another DNS address)"
    )]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("DNS server on {addr}: {message}")]
    Server { addr: SocketAddr, message: String },
}

#[derive(Debug, Default)]
struct Zone {
    names: HashMap<String, Ipv4Addr>,
    serial: u32,
}

/// The `.vm` records, shared between the daemon (which updates them) and the
/// server (which answers from them). Cloning is cheap; clones share the map.
#[derive(Debug, Clone, Default)]
pub struct DnsRecords {
    zone: Arc<RwLock<Zone>>,
}

fn valid_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl DnsRecords {
    pub fn new() -> Self {
        Self::default()
    }

    /// Points `<name>.vm` at `ip` (replacing any earlier address).
    pub fn set(&self, name: &str, ip: Ipv4Addr) -> Result<(), DnsError> {
        if !valid_label(name) {
            return Err(DnsError::BadName(name.to_string()));
        }
        let mut z = self.zone.write().unwrap_or_else(|p| p.into_inner());
        if z.names.insert(name.to_string(), ip) != Some(ip) {
            z.serial = z.serial.wrapping_add(1);
        }
        Ok(())
    }

    /// Removes `<name>.vm`; removing an unknown name does nothing.
    pub fn remove(&self, name: &str) {
        let mut z = self.zone.write().unwrap_or_else(|p| p.into_inner());
        if z.names.remove(name).is_some() {
            z.serial = z.serial.wrapping_add(1);
        }
    }

    pub fn get(&self, name: &str) -> Option<Ipv4Addr> {
        let z = self.zone.read().unwrap_or_else(|p| p.into_inner());
        z.names.get(name).copied()
    }

    /// The SOA serial: changes whenever the records do.
    pub fn serial(&self) -> u32 {
        self.zone.read().unwrap_or_else(|p| p.into_inner()).serial
    }

    pub fn len(&self) -> usize {
        self.zone
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .names
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the zone says about one question.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Refused,
    NxDomain,
    /// The name exists but has no record of the asked type.
    NoData,
    A(Ipv4Addr),
    Soa,
}

struct Handler {
    records: DnsRecords,
    origin: LowerName,
    origin_name: Name,
}

impl Handler {
    fn new(records: DnsRecords) -> Self {
        let origin_name = Name::from_ascii("vm.").unwrap_or_else(|_| Name::root());
        Self {
            records,
            origin: LowerName::new(&origin_name),
            origin_name,
        }
    }

    fn answer(&self, name: &LowerName, class: DNSClass, qtype: RecordType) -> Answer {
        if class != DNSClass::IN || !self.origin.zone_of(name) {
            return Answer::Refused;
        }
        if name.num_labels() == 1 {
            return match qtype {
                RecordType::SOA => Answer::Soa,
                _ => Answer::NoData,
            };
        }
        let label = match Name::from(name).iter().next() {
            Some(l) if name.num_labels() == 2 => String::from_utf8_lossy(l).to_ascii_lowercase(),
            _ => return Answer::NxDomain,
        };
        match self.records.get(&label) {
            None => Answer::NxDomain,
            Some(ip) if qtype == RecordType::A || qtype == RecordType::ANY => Answer::A(ip),
            Some(_) => Answer::NoData,
        }
    }

    fn soa(&self) -> Record {
        let mname = Name::from_ascii("localhost.").unwrap_or_else(|_| Name::root());
        let rname = Name::from_ascii("hostmaster.localhost.").unwrap_or_else(|_| Name::root());
        Record::from_rdata(
            self.origin_name.clone(),
            TTL,
            RData::SOA(SOA::new(
                mname,
                rname,
                self.records.serial(),
                3600,
                600,
                86400,
                TTL,
            )),
        )
    }
}

fn failed(request: &Request, code: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            let msg = builder.error_msg(&request.metadata, ResponseCode::NotImp);
            return response_handle
                .send_response(msg)
                .await
                .unwrap_or_else(|_| failed(request, ResponseCode::NotImp));
        }
        let Ok(info) = request.request_info() else {
            let msg = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return response_handle
                .send_response(msg)
                .await
                .unwrap_or_else(|_| failed(request, ResponseCode::FormErr));
        };
        let q = info.query;
        let answer = self.answer(q.name(), q.query_class(), q.query_type());
        tracing::debug!(name = %q.name(), qtype = %q.query_type(), ?answer, "dns query");

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = false;
        let mut answers = Vec::new();
        let mut soa = Vec::new();
        match answer {
            Answer::Refused => metadata.response_code = ResponseCode::Refused,
            Answer::NxDomain => {
                metadata.authoritative = true;
                metadata.response_code = ResponseCode::NXDomain;
                soa.push(self.soa());
            }
            Answer::NoData => {
                metadata.authoritative = true;
                soa.push(self.soa());
            }
            Answer::A(ip) => {
                metadata.authoritative = true;
                // The asker's spelling, for resolvers that randomise case.
                let name = q.original().name().clone();
                answers.push(Record::from_rdata(name, TTL, RData::A(A(ip))));
            }
            Answer::Soa => {
                metadata.authoritative = true;
                answers.push(self.soa());
            }
        }
        let code = metadata.response_code;
        let msg = builder.build(metadata, answers.iter(), [], soa.iter(), []);
        match response_handle.send_response(msg).await {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(error = %e, "sending a DNS answer");
                failed(request, code)
            }
        }
    }
}

/// A running `.vm` DNS server (UDP and TCP on the same address).
pub struct DnsServer {
    server: hickory_server::Server<Handler>,
    addr: SocketAddr,
}

impl DnsServer {
    /// Binds `listen` (UDP and TCP; port 0 picks a free port, the same for
    /// both) and serves `records` on the current tokio runtime.
    pub async fn start(listen: SocketAddr, records: DnsRecords) -> Result<Self, DnsError> {
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|source| DnsError::Bind {
                proto: "UDP",
                addr: listen,
                source,
            })?;
        let addr = udp.local_addr().map_err(|source| DnsError::Bind {
            proto: "UDP",
            addr: listen,
            source,
        })?;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| DnsError::Bind {
                proto: "TCP",
                addr,
                source,
            })?;
        let mut server = hickory_server::Server::new(Handler::new(records));
        server.register_socket(udp);
        server.register_listener(tcp, TCP_TIMEOUT, 64);
        tracing::info!(%addr, "serving the .vm zone");
        Ok(Self { server, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting queries and waits for the server tasks to end.
    pub async fn shutdown(mut self) -> Result<(), DnsError> {
        self.server
            .shutdown_gracefully()
            .await
            .map_err(|e| DnsError::Server {
                addr: self.addr,
                message: e.to_string(),
            })
    }
}

/// The fully qualified name of VM `name` in the zone (`name.vm.`).
pub fn fqdn(name: &str) -> Result<Name, DnsError> {
    if !valid_label(name) {
        return Err(DnsError::BadName(name.to_string()));
    }
    Name::from_str(&format!("{name}.{ZONE}.")).map_err(|_| DnsError::BadName(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lower(s: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(s).expect("name"))
    }

    #[test]
    fn zone_answers() {
        let r = DnsRecords::new();
        r.set("web", Ipv4Addr::new(172, 16, 0, 2)).expect("set");
        let h = Handler::new(r.clone());
        let a = |n: &str, t| h.answer(&lower(n), DNSClass::IN, t);
        assert_eq!(
            a("web.vm.", RecordType::A),
            Answer::A(Ipv4Addr::new(172, 16, 0, 2))
        );
        assert_eq!(
            a("WEB.vm.", RecordType::A),
            Answer::A(Ipv4Addr::new(172, 16, 0, 2))
        );
        assert_eq!(a("web.vm.", RecordType::AAAA), Answer::NoData);
        assert_eq!(a("db.vm.", RecordType::A), Answer::NxDomain);
        assert_eq!(a("x.web.vm.", RecordType::A), Answer::NxDomain);
        assert_eq!(a("vm.", RecordType::SOA), Answer::Soa);
        assert_eq!(a("vm.", RecordType::A), Answer::NoData);
        assert_eq!(a("example.com.", RecordType::A), Answer::Refused);
        assert_eq!(a("vmx.", RecordType::A), Answer::Refused);
        assert_eq!(a(".", RecordType::NS), Answer::Refused);
        assert_eq!(
            h.answer(&lower("web.vm."), DNSClass::CH, RecordType::A),
            Answer::Refused
        );
        r.remove("web");
        assert_eq!(a("web.vm.", RecordType::A), Answer::NxDomain);
    }

    #[test]
    fn serial_moves_with_changes() {
        let r = DnsRecords::new();
        let s0 = r.serial();
        r.set("a", Ipv4Addr::new(10, 0, 0, 2)).expect("set");
        let s1 = r.serial();
        assert_ne!(s0, s1);
        r.set("a", Ipv4Addr::new(10, 0, 0, 2)).expect("same");
        assert_eq!(r.serial(), s1);
        r.remove("nope");
        assert_eq!(r.serial(), s1);
        r.remove("a");
        assert_ne!(r.serial(), s1);
    }

    #[test]
    fn names_are_validated() {
        let r = DnsRecords::new();
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"x".repeat(64)] {
            assert!(r.set(bad, Ipv4Addr::LOCALHOST).is_err(), "{bad}");
        }
        assert!(r.is_empty());
        assert_eq!(
            fqdn("calm-otter").expect("ok").to_string(),
            "calm-otter.vm."
        );
    }
}
