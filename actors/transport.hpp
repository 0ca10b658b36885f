// The guard on every TCP port celer's actors talk through (docs/security.md). CAF's middleman
// carries actor messages between processes as BASP frames: a 32-byte header whose payload_len
// (up to 4 GiB) CAF allocates and zero-fills before a byte of the payload has arrived, with no
// setting that bounds it. celer therefore opens its ports and its outgoing connections itself and
// hands CAF's BASP broker connections that are guarded:
//
// - A connection first presents a fixed 144-byte preamble (magic, version, a shared token, the
//   dialing node's name) before any BASP byte is read; a peer that is not celer, or has the
//   wrong token, is closed at once.
// - A message whose payload is larger than max_message_bytes closes its connection at once;
//   nothing of that size is allocated.
// - Payloads over 64 KiB are counted against max_buffered_bytes, shared by every connection of
//   the process while they are being received, and freed as soon as they are delivered, so any
//   number of connections that announce large messages and never finish them hold at most that
//   (plus, each, a payload of up to 64 KiB, which is not counted: bound the number of
//   connections with the process's file limit).
// - Each refusal is counted (TransportStats, /metrics) and closes only its own connection.
// - With TLS (cluster.tls), the connection is TLS from its first byte, through CAF's OpenSSL
//   session: both ends present a certificate and require one the cluster's CA signed; the
//   preamble and BASP run inside it. A failed handshake is counted (tls_refused).
// - Not bounded: how long a connection may wait before it sends its preamble (it holds a socket
//   and nothing else).
//
// Both ends speak this: `celer serve` publishes through Transport::publish and the client
// library connects through Transport::connect.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include <caf/all.hpp>
#include <caf/io/middleman.hpp>

#include "runtime/config.hpp"   // TlsConfig
#include "runtime/metrics.hpp"  // TransportStats

namespace celer {

struct TransportLimits {
  uint64_t max_message_bytes = uint64_t{8} << 20;    // one message's payload
  uint64_t max_buffered_bytes = uint64_t{64} << 20;  // all large payloads being received at once
  std::string token;  // the shared secret a connection presents first ("" on both ends: none)
  // This end's node name, presented in the preamble of each connection it opens, so that the
  // node it dials knows which peer the connection is ("" for a client). Wire-layer faults
  // name links by it (LinkFault).
  std::string node_name;
  // Mutual TLS under the preamble: both ends need it, and the actor system must have been made
  // with configure_tls for the same files.
  TlsConfig tls;
};

// Checks that the files exist, parse, that the key is the certificate's and that the CA signed
// the certificate. Throws Error(invalid_argument) naming the file and what is wrong with it.
void check_tls_files(const TlsConfig& tls);

// Before the actor system is made: checks the files (check_tls_files) and sets up CAF's OpenSSL
// module to present and require them. Nothing when tls is not enabled.
void configure_tls(caf::actor_system_config& cfg, const TlsConfig& tls);

// `base` with each file that the environment names instead: CELER_TLS_CERTIFICATE,
// CELER_TLS_KEY, CELER_TLS_CA (how a command-line client, or a node with a certificate of its
// own, gets its files).
TlsConfig tls_from_environment(TlsConfig base = {});

// The longest token a preamble carries, and the longest node name.
constexpr size_t kMaxTransportToken = 64;
constexpr size_t kMaxTransportName = 64;

// A wire-layer fault (docs/chaos.md, `celer chaos`): what this end does, until `until`, to the
// frames it receives from one peer node. A fault on the link between two nodes is injected at
// both of them, so it acts in both directions.
//  drop, duplicate, corrupt: each actor message (a BASP direct or routed message) is, with
//    `probability`, thrown away, delivered twice, or delivered with one byte of its data
//    changed (a message that carries one of celer's types: past CAF's type information, which
//    CAF trusts); CAF's own frames (handshakes, heartbeats, monitors, down messages) pass.
//  delay: each actor message is, with `probability`, held for `delay`, and every frame behind it
//    on the connection waits too (a TCP link keeps its order): a slow link.
//  partition: every frame is thrown away, CAF's too, so heartbeats stop and CAF closes the
//    connection after middleman.connection-timeout, and a new one never completes its
//    handshake until the fault ends: the node is cut off.
struct LinkFault {
  enum class Kind : uint8_t { drop, delay, duplicate, corrupt, partition };
  Kind kind = Kind::drop;
  double probability = 1;
  std::chrono::milliseconds delay{0};
  std::chrono::steady_clock::time_point until;
};
// The peer a LinkFault for every node's link names.
inline const std::string kEveryPeer = "*";

// True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost).
bool is_loopback_host(const std::string& host);

class Transport {
 public:
  // Throws Error(invalid_argument) for a token longer than kMaxTransportToken.
  Transport(caf::actor_system& sys, TransportLimits limits);
  ~Transport();
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  // Listens on host:port (0: ephemeral) and makes `whom` the actor that connecting clients
  // reach there, announcing its typed interface; returns the bound port. Throws Error(io)
  // naming the address and the reason ("address already in use").
  template <class Handle>
  uint16_t publish(const Handle& whom, const std::string& host, uint16_t port) {
    return publish_actor(caf::actor_cast<caf::strong_actor_ptr>(whom), sys_.message_types(whom), host, port);
  }
  template <class Handle>
  void unpublish(const Handle& whom, uint16_t port) {
    static_cast<void>(sys_.middleman().unpublish(whom, port));
  }

  // Connects to the actor published at host:port within `timeout`, whose interface must
  // include Handle's. Throws Error(unavailable) naming the address and the reason (refused, no
  // answer, wrong token, not a celer port, another interface).
  // `peer`: the name of the node dialed, when it is one (what its link faults name).
  template <class Handle>
  Handle connect(const std::string& host, uint16_t port, std::chrono::milliseconds timeout, const std::string& peer = "") {
    return caf::actor_cast<Handle>(connect_actor(host, port, timeout, sys_.message_types<Handle>(), peer));
  }

  // From now until fault.until, the frames that arrive from node `peer` (kEveryPeer: from
  // every node, not from clients) meet `fault`; it replaces the one that peer had.
  void inject(const std::string& peer, const LinkFault& fault);

  const TransportLimits& limits() const;
  TransportStats stats() const;

  struct Guard;

 private:
  uint16_t publish_actor(caf::strong_actor_ptr whom, std::set<std::string> interface, const std::string& host, uint16_t port);
  caf::strong_actor_ptr connect_actor(const std::string& host, uint16_t port, std::chrono::milliseconds timeout,
                                      const std::set<std::string>& interface, const std::string& peer);

  caf::actor_system& sys_;
  std::shared_ptr<Guard> guard_;
};

}  // namespace celer
