//! Networks the gateway never dials, whatever a URL configuration says: a Maintainer must not
//! be able to make it reach the cloud metadata service or other link-local addresses.
//! Loopback and private ranges stay allowed, because receptive agents live on private networks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The setting that holds the list, named in messages so that an operator knows what to change.
pub const DENIED_NETWORKS_SETTING: &str = "KAS_GATEWAY_DIALER_DENIED_NETWORKS";

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix))
}

const fn v6(segments: [u16; 8], prefix: u8) -> IpNet {
    let [a, b, c, d, e, f, g, h] = segments;
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(a, b, c, d, e, f, g, h),
        prefix,
    ))
}

/// The default list. Evaluated at compile time, so a bad prefix cannot reach run time.
const DEFAULT: [IpNet; 9] = [
    // Link-local, which holds 169.254.169.254, the metadata service of most clouds.
    v4(169, 254, 0, 0, 16),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    // Unspecified ("this host" to the kernel, so effectively loopback on Linux).
    v4(0, 0, 0, 0, 8),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
    // Multicast and broadcast: never one agent.
    v4(224, 0, 0, 0, 4),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
    v4(255, 255, 255, 255, 32),
    // Metadata services outside link-local: AWS over IPv6, Alibaba Cloud.
    v6([0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254], 128),
    v4(100, 100, 100, 200, 32),
];

/// Networks the gateway refuses to dial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedNetworks(Vec<IpNet>);

impl Default for DeniedNetworks {
    /// Link-local, unspecified, multicast, broadcast and known metadata addresses.
    fn default() -> Self {
        Self(DEFAULT.to_vec())
    }
}

impl DeniedNetworks {
    /// These networks, host bits cleared.
    pub fn new(networks: impl IntoIterator<Item = IpNet>) -> Self {
        Self(networks.into_iter().map(|n| n.trunc()).collect())
    }

    /// An empty list: every destination is allowed.
    pub fn none() -> Self {
        Self(Vec::new())
    }

    /// The networks, in the order given.
    pub fn networks(&self) -> &[IpNet] {
        &self.0
    }

    /// The first refused network that holds `addr`. An IPv4 address and its IPv4-mapped IPv6
    /// form (`::ffff:a.b.c.d`) reach the same host, so each is checked in both forms.
    pub fn refusing(&self, addr: IpAddr) -> Option<&IpNet> {
        let other = match addr {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        };
        self.0
            .iter()
            .find(|net| net.contains(&addr) || other.is_some_and(|o| net.contains(&o)))
    }
}

impl std::fmt::Display for DeniedNetworks {
    /// The list as the setting spells it: comma-separated CIDRs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("169.254.169.254", Some("169.254.0.0/16"))]
    #[case("::ffff:169.254.169.254", Some("169.254.0.0/16"))]
    #[case("fe80::1", Some("fe80::/10"))]
    #[case("0.0.0.0", Some("0.0.0.0/8"))]
    #[case("::", Some("::/128"))]
    #[case("::ffff:0.0.0.0", Some("0.0.0.0/8"))]
    #[case("224.0.0.1", Some("224.0.0.0/4"))]
    #[case("239.255.255.250", Some("224.0.0.0/4"))]
    #[case("ff02::1", Some("ff00::/8"))]
    #[case("255.255.255.255", Some("255.255.255.255/32"))]
    #[case("fd00:ec2::254", Some("fd00:ec2::254/128"))]
    #[case("100.100.100.200", Some("100.100.100.200/32"))]
    #[case("127.0.0.1", None)]
    #[case("::1", None)]
    #[case("::ffff:127.0.0.1", None)]
    #[case("10.0.0.5", None)]
    #[case("172.16.0.1", None)]
    #[case("192.168.1.1", None)]
    #[case("fd12:3456::1", None)]
    #[case("100.64.0.1", None)]
    #[case("8.8.8.8", None)]
    #[case("2001:db8::1", None)]
    fn default_list(#[case] addr: &str, #[case] refused_by: Option<&str>) {
        let denied = DeniedNetworks::default();
        let found = denied
            .refusing(addr.parse().unwrap())
            .map(ToString::to_string);
        assert_eq!(found.as_deref(), refused_by, "{addr}");
    }

    #[test]
    fn a_mapped_network_refuses_the_plain_address_too() {
        let denied = DeniedNetworks::new(["::ffff:10.0.0.0/104".parse().unwrap()]);
        assert!(denied.refusing("10.1.2.3".parse().unwrap()).is_some());
        assert!(denied.refusing("11.1.2.3".parse().unwrap()).is_none());
    }

    #[test]
    fn none_refuses_nothing_and_host_bits_are_cleared() {
        assert!(
            DeniedNetworks::none()
                .refusing("169.254.169.254".parse().unwrap())
                .is_none()
        );
        let denied = DeniedNetworks::new(["10.1.2.3/8".parse().unwrap()]);
        assert_eq!(denied.to_string(), "10.0.0.0/8");
    }
}
