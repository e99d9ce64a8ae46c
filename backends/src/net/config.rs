//! virtio-net feature bits and configuration space.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Length of the configuration space we expose (mac, status, max_virtqueue_pairs, mtu).
pub const NET_CONFIG_SPACE_LEN: usize = 12;

/// What the device offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// The guest's MAC address (VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    /// Queue pairs (VIRTIO_NET_F_MQ when more than one).
    pub queue_pairs: u16,
    /// MTU to offer (VIRTIO_NET_F_MTU), if any.
    pub mtu: Option<u16>,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            // A locally administered unicast address.
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            queue_pairs: 1,
            mtu: None,
        }
    }
}

/// The device features offered.
pub fn net_features(opts: &NetOptions) -> u64 {
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_CTRL_VQ,
    ];
    let mut f = bits.iter().fold(0u64, |f, b| f | (1u64 << b));
    if opts.queue_pairs > 1 {
        f |= 1u64 << VIRTIO_NET_F_MQ;
    }
    if opts.mtu.is_some() {
        f |= 1u64 << VIRTIO_NET_F_MTU;
    }
    f
}

/// `struct virtio_net_config` (little-endian): mac, status = LINK_UP, max_virtqueue_pairs,
/// mtu.
pub fn net_config_space(opts: &NetOptions) -> [u8; NET_CONFIG_SPACE_LEN] {
    let mut c = [0u8; NET_CONFIG_SPACE_LEN];
    c[0..6].copy_from_slice(&opts.mac);
    c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&opts.queue_pairs.max(1).to_le_bytes());
    c[10..12].copy_from_slice(&opts.mtu.unwrap_or(0).to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn layout_matches_virtio_bindings() {
        assert_eq!(offset_of!(virtio_net_config, mac), 0);
        assert_eq!(offset_of!(virtio_net_config, status), 6);
        assert_eq!(offset_of!(virtio_net_config, max_virtqueue_pairs), 8);
        assert_eq!(offset_of!(virtio_net_config, mtu), 10);
        assert_eq!(
            std::mem::size_of::<virtio_net_hdr_v1>(),
            super::super::VNET_HDR_LEN
        );
    }

    #[test]
    fn features_and_config() {
        let o = NetOptions {
            queue_pairs: 2,
            mtu: Some(1500),
            ..Default::default()
        };
        let f = net_features(&o);
        for b in [
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CTRL_VQ,
        ] {
            assert_ne!(f & (1 << b), 0, "bit {b}");
        }
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        let c = net_config_space(&o);
        assert_eq!(&c[..6], &o.mac);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        let f1 = net_features(&NetOptions::default());
        assert_eq!(f1 & (1 << VIRTIO_NET_F_MQ), 0);
        assert_eq!(f1 & (1 << VIRTIO_NET_F_MTU), 0);
    }
}
