// How the guard hooks into CAF 0.17: the BASP broker reads through scribes (one per connection)
// and asks each for the next read's size with configure_read(exactly(n)); the scribe's stream
// resizes its buffer to n when the read starts. GuardedScribe is CAF's own TCP scribe with that
// one call checked (and the preamble read before BASP sees anything); GuardedDoorman accepts
// connections as GuardedScribes. publish() and connect() build both and hand them to the BASP
// broker with the same messages CAF's middleman actor sends it, so everything above the socket
// (handshakes, proxies, monitors, heartbeats) is CAF's.
#include "actors/transport.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <caf/io/basp_broker.hpp>
#include <caf/io/network/default_multiplexer.hpp>
#include <caf/io/network/doorman_impl.hpp>
#include <caf/io/network/stream_impl.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/openssl/session.hpp>
#include <caf/policy/tcp.hpp>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "runtime/error.hpp"
#include "schema/codec.hpp"

namespace celer {

namespace io = caf::io;
namespace net = caf::io::network;

// What a wire-layer fault does to the frame being read (LinkFault).
enum class Fate : uint8_t { deliver, drop, duplicate, corrupt, delay };

// The wire-layer faults of one process and the thread that ends their delays. Shared by its
// connections; Transport's destructor stops it (a delay that has not ended delivers nothing
// after that: the actor system is going).
class LinkChaos {
 public:
  ~LinkChaos() { stop(); }

  void inject(const std::string& peer, const LinkFault& fault) {
    std::lock_guard<std::mutex> lock(mu_);
    faults_[peer] = fault;
    active_.store(true);
  }

  // The fate of a frame of operation `op` from `peer`; `delay` is set for Fate::delay.
  Fate fate(const std::string& peer, io::basp::message_type op, std::chrono::milliseconds& delay) {
    if (peer.empty() || !active_.load(std::memory_order_relaxed)) return Fate::deliver;
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = std::chrono::steady_clock::now();
    for (auto it = faults_.begin(); it != faults_.end();) it = it->second.until <= now ? faults_.erase(it) : std::next(it);
    if (faults_.empty()) {
      active_.store(false);
      return Fate::deliver;
    }
    auto it = faults_.find(peer);
    if (it == faults_.end()) it = faults_.find(kEveryPeer);
    if (it == faults_.end()) return Fate::deliver;
    const LinkFault& f = it->second;
    if (f.kind == LinkFault::Kind::partition) return Fate::drop;
    using io::basp::message_type;
    if (op != message_type::direct_message && op != message_type::routed_message) return Fate::deliver;
    if (std::uniform_real_distribution<double>(0, 1)(rng_) >= f.probability) return Fate::deliver;
    switch (f.kind) {
      case LinkFault::Kind::drop: return Fate::drop;
      case LinkFault::Kind::duplicate: return Fate::duplicate;
      case LinkFault::Kind::corrupt: return Fate::corrupt;
      case LinkFault::Kind::delay: delay = f.delay; return Fate::delay;
      case LinkFault::Kind::partition: break;
    }
    return Fate::drop;
  }

  // A number in [0, n), from the same generator.
  size_t pick(size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    return std::uniform_int_distribution<size_t>(0, n - 1)(rng_);
  }

  // Runs `then` on the timer thread at `when` (it posts to the multiplexer); false once stopped.
  bool at(std::chrono::steady_clock::time_point when, std::function<void()> then) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return false;
    timers_.emplace(when, std::move(then));
    if (!timer_.joinable()) timer_ = std::thread([this] { run_timers(); });
    wake_.notify_all();
    return true;
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopped_ = true;
      timers_.clear();  // (each holds a connection: let them go)
    }
    wake_.notify_all();
    if (timer_.joinable() && timer_.get_id() != std::this_thread::get_id()) timer_.join();
    else if (timer_.joinable()) timer_.detach();
  }

  std::atomic<uint64_t> dropped{0}, delayed{0}, duplicated{0}, corrupted{0};

 private:
  void run_timers() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopped_) {
      if (timers_.empty()) {
        wake_.wait(lock);
        continue;
      }
      const auto next = timers_.begin()->first;
      if (std::chrono::steady_clock::now() < next) {
        wake_.wait_until(lock, next);
        continue;
      }
      {
        std::function<void()> then = std::move(timers_.begin()->second);
        timers_.erase(timers_.begin());
        lock.unlock();
        then();
      }  // (what it held goes before the lock is taken again)
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<bool> active_{false};
  std::map<std::string, LinkFault> faults_;
  std::mt19937_64 rng_{std::random_device{}()};
  std::multimap<std::chrono::steady_clock::time_point, std::function<void()>> timers_;
  std::thread timer_;
  bool stopped_ = false;
};

struct Transport::Guard {
  TransportLimits limits;
  std::atomic<uint64_t> accepted{0}, bad_preamble{0}, bad_token{0}, malformed{0}, oversized{0}, over_budget{0},
      tls_refused{0};
  std::atomic<uint64_t> buffered{0};
  LinkChaos chaos;

  // Takes n bytes of the shared budget for large payloads, if that many are left.
  bool reserve(uint64_t n) {
    uint64_t now = buffered.load();
    do {
      if (n > limits.max_buffered_bytes - std::min(now, limits.max_buffered_bytes)) return false;  // now + n, without overflow
    } while (!buffered.compare_exchange_weak(now, now + n));
    return true;
  }
  void release(uint64_t n) { buffered.fetch_sub(n); }
};

namespace {

// The preamble: magic and version (8 bytes), the token's length (1), the node name's length
// (1), zeros (6), the token zero-padded to 64 bytes, the connecting node's name zero-padded to
// 64 bytes (none for a client). Fixed-size, so the guard reads exactly this much before deciding.
constexpr char kMagic[8] = {'C', 'E', 'L', 'E', 'R', 'T', 'P', '2'};
constexpr size_t kNameOffset = 16 + kMaxTransportToken;
constexpr size_t kPreambleSize = kNameOffset + kMaxTransportName;

// Payloads up to this size are read without asking the budget: BASP headers, handshakes,
// requests and token chunks are all far smaller.
constexpr uint64_t kUnbudgeted = 64 * 1024;

// Where the data of a BASP payload starts that carries one of celer's own types: past the end
// of the last type name "celer.*" CAF wrote ahead of the data (n: none found).
size_t data_start(const char* p, size_t n) {
  static constexpr char kPrefix[] = "celer.";
  const size_t k = sizeof(kPrefix) - 1;
  size_t last = n;
  for (size_t i = 0; i + k <= n; ++i)
    if (std::memcmp(p + i, kPrefix, k) == 0) last = i;
  if (last == n) return n;
  size_t end = last + k;
  auto in_name = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' || c == '<' || c == '>'; };
  while (end < n && in_name(p[end])) ++end;
  return end;
}

std::array<char, kPreambleSize> make_preamble(const std::string& token, const std::string& name) {
  std::array<char, kPreambleSize> p{};
  std::memcpy(p.data(), kMagic, sizeof(kMagic));
  p[8] = static_cast<char>(token.size());
  p[9] = static_cast<char>(name.size());
  std::memcpy(p.data() + 16, token.data(), token.size());
  std::memcpy(p.data() + kNameOffset, name.data(), name.size());
  return p;
}

enum class PreambleCheck { ok, not_celer, wrong_token };

PreambleCheck check_preamble(const char* p, const std::string& token) {
  if (std::memcmp(p, kMagic, sizeof(kMagic)) != 0) return PreambleCheck::not_celer;
  const auto length = static_cast<unsigned char>(p[8]);
  const auto name_length = static_cast<unsigned char>(p[9]);
  for (int i = 10; i < 16; ++i)
    if (p[i] != 0) return PreambleCheck::not_celer;
  if (length > kMaxTransportToken || name_length > kMaxTransportName) return PreambleCheck::not_celer;
  // A node name as the config allows them (A-Z, a-z, 0-9, _ and -), then zeros.
  for (size_t i = kNameOffset; i < kPreambleSize; ++i) {
    const auto ch = static_cast<unsigned char>(p[i]);
    const bool in_name = i < kNameOffset + name_length;
    if (in_name ? !(std::isalnum(ch) || ch == '_' || ch == '-') : ch != 0) return PreambleCheck::not_celer;
  }
  // Compared in full whatever the first difference, so timing tells nothing about the token.
  const auto expected = make_preamble(token, "");
  unsigned char diff = 0;
  diff |= static_cast<unsigned char>(p[8] ^ expected[8]);
  for (size_t i = 16; i < kNameOffset; ++i) diff |= static_cast<unsigned char>(p[i] ^ expected[i]);
  return diff == 0 ? PreambleCheck::ok : PreambleCheck::wrong_token;
}

uint64_t big_endian(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

// Whether a BASP header (CAF 0.17's layout: operation, two pads, flags, payload_len,
// operation_data, source and destination actor, big-endian) may reach CAF here. CAF's own check
// lets through headers its handlers then trust, such as a handshake without a payload (a null
// dereference that takes the process down), and a handshake of the wrong side. The rules here
// are what a celer peer sends: the handshake of its side (first, and again when CAF repeats it),
// with its payload; messages only after it, each with the fields its kind needs.
bool header_allowed(const char* h, bool accepting, bool handshaken) {
  const auto op = static_cast<io::basp::message_type>(h[0]);
  const uint64_t len = big_endian(h + 4, 4), data = big_endian(h + 8, 8);
  const uint64_t source = big_endian(h + 16, 8), dest = big_endian(h + 24, 8);
  using io::basp::message_type;
  const bool own_handshake = accepting ? op == message_type::client_handshake && len > 0 && source == 0 && dest == 0
                                       : op == message_type::server_handshake && len > 0 && data != 0 && dest == 0;
  if (own_handshake) return true;
  if (!handshaken) return false;
  switch (op) {
    case message_type::direct_message:
    case message_type::routed_message: return len > 0 && dest != 0;
    case message_type::monitor_message: return len > 0 && data == 0;
    case message_type::down_message: return len > 0 && source != 0 && dest == 0 && data == 0;
    case message_type::heartbeat: return len == 0 && source == 0 && dest == 0 && data == 0;
    default: return false;  // the other side's handshake, or no such operation
  }
}

// How a guarded connection reads and writes its socket: plain TCP (CAF's own policy), or TLS
// through CAF's OpenSSL session, which drives the handshake from inside its reads and writes.
using TcpPolicy = caf::policy::tcp;

class TlsPolicy {
 public:
  TlsPolicy(caf::openssl::session_ptr session, std::shared_ptr<Transport::Guard> guard, bool accepting)
      : session_(std::move(session)), guard_(std::move(guard)), accepting_(accepting) {}
  TlsPolicy(const TlsPolicy&) = delete;
  TlsPolicy& operator=(const TlsPolicy&) = delete;

  // An accepted connection that ends before a byte came through the session failed its
  // handshake (no certificate, one the cluster's CA did not sign, not TLS at all, or none
  // before the peer left), whichever call on whichever side saw it fail.
  ~TlsPolicy() {
    if (accepting_ && !established_) ++guard_->tls_refused;
  }

  // OpenSSL reports why a call failed through a queue per thread, and SSL_get_error reads that
  // queue: an error another connection left on this (the multiplexer's) thread would make a
  // read that merely has to wait look failed, and close a healthy connection. CAF's session does
  // not clear it, so every call here does.
  net::rw_state read_some(size_t& result, net::native_socket fd, void* buf, size_t len) {
    ERR_clear_error();
    const net::rw_state r = session_->read_some(result, fd, buf, len);
    if (r == net::rw_state::success && result > 0) established_ = true;
    return r;
  }

  net::rw_state write_some(size_t& result, net::native_socket fd, const void* buf, size_t len) {
    ERR_clear_error();
    return session_->write_some(result, fd, buf, len);
  }

  // Decrypted bytes wait inside the session, where the socket's readiness does not show them.
  bool must_read_more(net::native_socket fd, size_t threshold) { return session_->must_read_more(fd, threshold); }

 private:
  caf::openssl::session_ptr session_;
  std::shared_ptr<Transport::Guard> guard_;
  const bool accepting_;
  bool established_ = false;
};

// CAF's TCP scribe (io::network::scribe_impl) with the socket policy as a parameter, the
// preamble written first (connecting) or read first (accepting), and every read size checked.
template <class Policy>
class GuardedScribe final : public io::scribe {
 public:
  // `peer`: the node dialed (connecting), or "" (accepting: the preamble names it).
  template <class... PolicyArgs>
  GuardedScribe(net::default_multiplexer& mx, net::native_socket fd, std::shared_ptr<Transport::Guard> guard,
                bool accepting, std::string peer, PolicyArgs&&... policy_args)
      : io::scribe(net::conn_hdl_from_socket(fd)),
        stream_(mx, fd, std::forward<PolicyArgs>(policy_args)...),
        guard_(std::move(guard)),
        accepting_(accepting),
        awaiting_preamble_(accepting),
        peer_(std::move(peer)) {}

  ~GuardedScribe() override {
    release();
    drop_held();
  }

  void configure_read(io::receive_policy::config config) override {
    // While frames that a fault held or copied are handed to BASP, the socket's reads stay as
    // the guard set them: BASP's requests then describe the replayed frame, not the socket.
    if (refused_ || replaying_) return;
    if (awaiting_preamble_) {
      // BASP's first read waits until the peer has shown it is one of ours: the magic first,
      // so that a stranger's first 8 bytes already close it, then the rest.
      requested_ = config;
      const size_t next = preamble_got_ == 0 ? sizeof(kMagic) : kPreambleSize - preamble_got_;
      read_next(io::receive_policy::exactly(next));
      return;
    }
    const uint64_t n = config.second;
    if (n > guard_->limits.max_message_bytes) return refuse(guard_->oversized);
    if (n > kUnbudgeted) {
      if (!guard_->reserve(n)) return refuse(guard_->over_budget);
      reserved_ += n;
    }
    read_next(config);
  }

  // BASP writes its server handshake as soon as a connection is accepted: it stays in the
  // buffer until the peer has shown it is one of ours, so a stranger learns nothing.
  void flush() override {
    if (!awaiting_preamble_ && !refused_) stream_.flush(this);
  }

  bool consume(caf::execution_unit* ctx, const void* buf, size_t n) override {
    if (refused_) return true;  // dropped: the connection is being closed
    if (awaiting_preamble_) {
      std::memcpy(preamble_.data() + preamble_got_, buf, std::min(n, kPreambleSize - preamble_got_));
      preamble_got_ += n;
      if (preamble_got_ == sizeof(kMagic)) {
        if (std::memcmp(preamble_.data(), kMagic, sizeof(kMagic)) != 0) {
          refuse(guard_->bad_preamble);
          return true;
        }
        read_next(io::receive_policy::exactly(kPreambleSize - sizeof(kMagic)));
        return true;
      }
      switch (check_preamble(preamble_.data(), guard_->limits.token)) {
        case PreambleCheck::not_celer: refuse(guard_->bad_preamble); return true;
        case PreambleCheck::wrong_token: refuse(guard_->bad_token); return true;
        case PreambleCheck::ok: break;
      }
      peer_.assign(preamble_.data() + kNameOffset, static_cast<unsigned char>(preamble_[9]));
      ++guard_->accepted;
      awaiting_preamble_ = false;
      configure_read(requested_);
      stream_.flush(this);
      return true;
    }
    // BASP reads a header, then its payload when it has one: the same framing, followed here.
    const char* bytes = static_cast<const char*>(buf);
    if (!awaiting_payload_) {
      if (n != io::basp::header_size || !header_allowed(bytes, accepting_, handshaken_)) {
        refuse(guard_->malformed);
        return true;
      }
      const auto op = static_cast<io::basp::message_type>(bytes[0]);
      const uint64_t len = big_endian(bytes + 4, 4);
      std::chrono::milliseconds delay{0};
      fate_ = guard_->chaos.fate(peer_, op, delay);
      awaiting_payload_ = len > 0;
      if (fate_ == Fate::drop) {
        // Read past it here: BASP never hears of it (nor of a handshake it would have made).
        ++guard_->chaos.dropped;
        return read_own(len);
      }
      handshaken_ = true;
      if (fate_ == Fate::delay || !held_.empty()) {
        // Held, and everything behind it on this connection, in order.
        auto due = std::chrono::steady_clock::now() + delay;
        if (!held_.empty()) due = std::max(due, held_.back().due);
        if (!hold(n)) return true;
        held_.push_back(HeldFrame{std::vector<char>(bytes, bytes + n), len == 0, fate_ == Fate::duplicate, due});
        if (fate_ == Fate::delay) ++guard_->chaos.delayed;
        if (fate_ == Fate::duplicate) ++guard_->chaos.duplicated;
        fate_ = Fate::deliver;
        read_own(len);
        if (len == 0) deliver_due(ctx);
        return true;
      }
      if (fate_ == Fate::duplicate) header_.assign(bytes, bytes + n);
    } else {
      awaiting_payload_ = false;
      if (!held_.empty() && !held_.back().complete) {
        const bool large = end_own_payload();
        if (!hold(n)) return true;
        held_.back().bytes.insert(held_.back().bytes.end(), bytes, bytes + n);
        held_.back().complete = true;
        if (large) std::vector<char>().swap(stream_.rd_buf());
        read_own(0);
        deliver_due(ctx);
        return true;
      }
      if (fate_ == Fate::drop) {
        if (end_own_payload()) std::vector<char>().swap(stream_.rd_buf());
        return read_own(0);
      }
      if (fate_ == Fate::corrupt) {
        // One byte of the message's data changed (a Cap'n Proto message or its checksum, which
        // schema/codec.hpp refuses; a partial sum, which the all-reduce refuses; an id or a
        // handle, which the actors check), never CAF's type information ahead of it, which CAF
        // 0.17 trusts (a changed type number can make a message into an exit message):
        // corruption there is what TLS's integrity check is for. The data follows the last of
        // celer's type names; a message with none (atoms and strings only) passes unchanged.
        if (const size_t from = data_start(bytes, n); from < n) {
          stream_.rd_buf()[from + guard_->chaos.pick(n - from)] ^= static_cast<char>(1 + guard_->chaos.pick(255));
          ++guard_->chaos.corrupted;
        }
      }
    }
    std::vector<char> copy;
    if (fate_ == Fate::duplicate && !awaiting_payload_) {  // (an actor message always has a payload)
      copy = header_;
      copy.insert(copy.end(), bytes, bytes + n);
      ++guard_->chaos.duplicated;
    }
    const uint64_t held = reserved_;  // reserved for this read (one made while BASP reads the header is not)
    bool ok = io::scribe::consume(ctx, buf, n);
    if (held > 0) {
      // The large payload has been delivered: give its memory back now, not when the
      // connection closes (a vector keeps its capacity when it shrinks).
      release();
      std::vector<char>().swap(stream_.rd_buf());
    }
    if (!copy.empty()) ok = replay(ctx, copy) && ok;
    if (!awaiting_payload_) fate_ = Fate::deliver;
    return ok;
  }

  void ack_writes(bool enable) override { stream_.ack_writes(enable); }
  std::vector<char>& wr_buf() override { return stream_.wr_buf(); }
  std::vector<char>& rd_buf() override { return stream_.rd_buf(); }
  void graceful_shutdown() override {
    stream_.graceful_shutdown();
    detach(&stream_.backend(), false);
  }
  std::string addr() const override {
    auto x = net::remote_addr_of_fd(stream_.fd());
    return x ? *x : std::string();
  }
  uint16_t port() const override {
    auto x = net::remote_port_of_fd(stream_.fd());
    return x ? *x : 0;
  }
  void add_to_loop() override { stream_.activate(this); }
  void remove_from_loop() override { stream_.passivate(); }

 private:
  void read_next(io::receive_policy::config config) {
    stream_.configure_read(config);
    if (launched_) return;
    launched_ = true;
    stream_.start(this);
    if (!accepting_) {
      // The connecting end speaks first: the accepting end says nothing until it has read this.
      const auto preamble = make_preamble(guard_->limits.token, guard_->limits.node_name);
      std::vector<char>& out = stream_.wr_buf();
      out.insert(out.begin(), preamble.begin(), preamble.end());
      stream_.flush(this);
    } else if constexpr (std::is_same_v<Policy, TlsPolicy>) {
      // Schedules a write event, so that a TLS handshake waiting to write goes on.
      stream_.force_empty_write(this);
    }
  }

  void release() {
    if (reserved_ > 0) guard_->release(reserved_);
    reserved_ = 0;
  }

  // The connection ends: what a delay held is not delivered, and its budget is given back.
  void drop_held() {
    if (held_bytes_ > 0) guard_->release(held_bytes_);
    held_bytes_ = 0;
    held_.clear();
  }

  // Frames a delay holds count against max_buffered_bytes like large payloads: past it the
  // connection is closed (over_budget), as it would be for a peer that never finishes one.
  bool hold(uint64_t n) {
    if (!guard_->reserve(n)) {
      refuse(guard_->over_budget);
      return false;
    }
    held_bytes_ += n;
    return true;
  }

  // The next read of a frame BASP is not told about (a wire fault drops or holds it): its
  // payload of len bytes, or (0) the next header. Checked and budgeted as configure_read does
  // BASP's reads.
  bool read_own(uint64_t len) {
    if (len > guard_->limits.max_message_bytes) {
      refuse(guard_->oversized);
      return true;
    }
    if (len > kUnbudgeted) {
      if (!guard_->reserve(len)) {
        refuse(guard_->over_budget);
        return true;
      }
      reserved_ += len;
    }
    stream_.configure_read(io::receive_policy::exactly(len > 0 ? len : io::basp::header_size));
    return true;
  }

  // A payload read by read_own has arrived: its budget is given back. True when it was a large
  // one, whose buffer the caller frees once it is done with the bytes.
  bool end_own_payload() {
    const bool large = reserved_ > 0;
    release();
    return large;
  }

  // Hands BASP one whole frame (header and payload) that is not what the socket just read,
  // keeping the socket's read buffer (which may hold part of the next frame) as it was.
  bool replay(caf::execution_unit* ctx, const std::vector<char>& frame) {
    std::vector<char> keep;
    keep.swap(stream_.rd_buf());
    replaying_ = true;
    bool ok = true;
    for (size_t at = 0; ok && at < frame.size();) {
      const size_t part = at == 0 ? std::min(frame.size(), io::basp::header_size) : frame.size() - at;
      stream_.rd_buf().assign(frame.begin() + static_cast<std::ptrdiff_t>(at), frame.begin() + static_cast<std::ptrdiff_t>(at + part));
      ok = io::scribe::consume(ctx, stream_.rd_buf().data(), part);
      at += part;
    }
    replaying_ = false;
    keep.swap(stream_.rd_buf());
    return ok;
  }

  // Delivers the held frames whose delay has ended, in order; asks the timer to come back for
  // the next one.
  void deliver_due(caf::execution_unit* ctx) {
    const auto now = std::chrono::steady_clock::now();
    while (!held_.empty() && held_.front().complete && held_.front().due <= now && !detached()) {
      HeldFrame f = std::move(held_.front());
      held_.pop_front();
      guard_->release(f.bytes.size());
      held_bytes_ -= f.bytes.size();
      replay(ctx, f.bytes);
      if (f.twice) replay(ctx, f.bytes);
    }
    if (held_.empty() || !held_.front().complete || detached() || timer_set_) return;
    timer_set_ = true;
    caf::intrusive_ptr<GuardedScribe> self{this};
    const bool timed = guard_->chaos.at(held_.front().due, [self] {
      self->stream_.backend().post([self] {
        self->timer_set_ = false;
        if (!self->detached()) self->deliver_due(&self->stream_.backend());
      });
    });
    if (!timed) {  // the transport is stopping: nothing waits any more
      timer_set_ = false;
      for (auto& f : held_) f.due = now;
      deliver_due(ctx);
    }
  }

  // Counts the refusal and closes the connection: reads stop growing the buffer now, and the
  // close runs on the multiplexer once the current event is handled (BASP may be mid-call).
  void refuse(std::atomic<uint64_t>& counter) {
    ++counter;
    refused_ = true;
    release();
    drop_held();
    read_next(io::receive_policy::at_most(1024));
    ::shutdown(stream_.fd(), SHUT_RDWR);
    caf::intrusive_ptr<GuardedScribe> self{this};
    stream_.backend().post([self] {
      if (!self->detached()) self->io_failure(&self->stream_.backend(), net::operation::read);
    });
  }

  bool launched_ = false;
  net::stream_impl<Policy> stream_;
  std::shared_ptr<Transport::Guard> guard_;
  const bool accepting_;  // the accepting end (expects a preamble and a client handshake)
  bool awaiting_preamble_;
  bool handshaken_ = false;
  bool awaiting_payload_ = false;
  std::array<char, kPreambleSize> preamble_{};
  size_t preamble_got_ = 0;
  bool refused_ = false;
  uint64_t reserved_ = 0;
  io::receive_policy::config requested_ = io::receive_policy::exactly(io::basp::header_size);
  // Wire-layer faults (LinkFault): the peer node's name ("" for a client, which none applies
  // to), the fate of the frame being read, its header when it is to be delivered twice, and the
  // frames held by a delay (with everything behind them).
  std::string peer_;
  Fate fate_ = Fate::deliver;
  std::vector<char> header_;
  struct HeldFrame {
    std::vector<char> bytes;  // header, then payload
    bool complete;
    bool twice;
    std::chrono::steady_clock::time_point due;
  };
  std::deque<HeldFrame> held_;
  uint64_t held_bytes_ = 0;  // of held_, taken from the shared budget
  bool replaying_ = false;
  bool timer_set_ = false;
};

// A TLS session on a socket (nonblocking from here on), its handshake begun; nullptr when none
// could be made.
caf::openssl::session_ptr start_tls(caf::actor_system& sys, net::native_socket fd, bool accepting) {
  net::nonblocking(fd, true);
  ERR_clear_error();  // see TlsPolicy
  try {
    return caf::openssl::make_session(sys, fd, accepting);
  } catch (const std::exception&) {  // CAF raises on files it cannot load (check_tls_files saw them load)
    return nullptr;
  }
}

// The connecting end's TLS handshake, finished here, before CAF has the socket: CAF's session
// drops what is written while its handshake is still going on, and the connecting end writes
// first (the preamble). A read of nothing reports "indeterminate" once the handshake is done,
// "success" while it waits for the peer. "" or why it failed.
std::string finish_tls_handshake(caf::openssl::session& session, net::native_socket fd,
                                 std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    size_t got = 0;
    ERR_clear_error();  // see TlsPolicy
    const net::rw_state state = session.read_some(got, fd, nullptr, 0);
    if (state == net::rw_state::indeterminate) return {};
    if (state == net::rw_state::failure) return "the TLS handshake failed: the server did not accept this end's "
                                                "certificate, or its own is not signed by this end's CA";
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return "no TLS handshake within the timeout";
    // Readable is what the handshake waits for; the short bound covers a wait to write.
    pollfd p{fd, POLLIN, 0};
    ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 10)));
  }
}

class GuardedDoorman final : public net::doorman_impl {
 public:
  GuardedDoorman(net::default_multiplexer& mx, net::native_socket fd, std::shared_ptr<Transport::Guard> guard)
      : net::doorman_impl(mx, fd), guard_(std::move(guard)) {}

  bool new_connection() override {
    const net::native_socket fd = acceptor_.accepted_socket();
    if (detached()) {  // closed while the multiplexer still had its events: the socket is ours to close
      if (fd != net::invalid_native_socket) net::close_socket(fd);
      return false;
    }
    auto& mx = acceptor_.backend();
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // tokens leave at once
    io::scribe_ptr scribe;
    if (!guard_->limits.tls.enabled()) {
      scribe = caf::make_counted<GuardedScribe<TcpPolicy>>(mx, fd, guard_, true, std::string());
    } else if (auto session = start_tls(parent()->system(), fd, true)) {
      scribe = caf::make_counted<GuardedScribe<TlsPolicy>>(mx, fd, guard_, true, std::string(), std::move(session), guard_, true);
    } else {
      ++guard_->tls_refused;
      net::close_socket(fd);
      return true;
    }
    auto hdl = scribe->hdl();
    parent()->add_scribe(std::move(scribe));
    return io::doorman::new_connection(&mx, hdl);
  }

 private:
  std::shared_ptr<Transport::Guard> guard_;
};

std::string errno_text(int err) {
  std::string s = std::strerror(err);
  if (!s.empty()) s[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(s[0])));
  return s;
}

struct AddrInfo {
  addrinfo* list = nullptr;
  ~AddrInfo() {
    if (list) freeaddrinfo(list);
  }
};

// getaddrinfo for TCP; the error text on failure.
std::string resolve(const std::string& host, uint16_t port, bool passive, AddrInfo& out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  const int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &out.list);
  if (rc != 0) return std::string("cannot resolve '") + host + "': " + gai_strerror(rc);
  return {};
}

net::default_multiplexer& multiplexer(caf::actor_system& sys) {
  return static_cast<net::default_multiplexer&>(sys.middleman().backend());
}

caf::actor basp_broker(caf::actor_system& sys) { return sys.middleman().named_broker<io::basp_broker>(caf::atom("BASP")); }

// A blocking TCP connection to host:port within `timeout`, or the reason there is none.
int connect_tcp(const std::string& host, uint16_t port, std::chrono::milliseconds timeout, std::string& why) {
  AddrInfo ai;
  if (why = resolve(host, port, false, ai); !why.empty()) return -1;
  why = "no address";
  // One deadline for all of the host's addresses, not one timeout each.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (addrinfo* a = ai.list; a; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why = errno_text(errno);
      continue;
    }
    const int flags = fcntl(fd, F_GETFL, 0);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    int err = 0;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      err = errno;
      if (err == EINPROGRESS) {
        pollfd p{fd, POLLOUT, 0};
        int ready;
        do {
          const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
          ready = left.count() <= 0 ? 0 : ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), INT32_MAX)));
        } while (ready < 0 && errno == EINTR);
        socklen_t len = sizeof(err);
        if (ready <= 0) err = ETIMEDOUT;
        else getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      }
    }
    if (err != 0) {
      why = errno_text(err);
      ::close(fd);
      continue;
    }
    fcntl(fd, F_SETFL, flags);
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
  }
  return -1;
}

}  // namespace

bool is_loopback_host(const std::string& host) {
  if (host == "localhost" || host == "::1" || host == "[::1]") return true;
  in_addr a{};
  if (inet_pton(AF_INET, host.c_str(), &a) == 1) return (ntohl(a.s_addr) >> 24) == 127;
  return false;
}

namespace {

// OpenSSL's error queue as text ("" when empty), emptied.
std::string ssl_errors() {
  std::string out;
  while (const unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    out += (out.empty() ? "" : "; ") + std::string(buf);
  }
  return out;
}

}  // namespace

void check_tls_files(const TlsConfig& tls) {
  if (!tls.enabled()) return;
  auto fail = [](const std::string& what) { throw Error(ErrorCode::invalid_argument, "tls: " + what); };
  if (tls.key.empty() || tls.ca.empty()) fail("certificate, key and ca are all required");
  std::unique_ptr<SSL_CTX, void (*)(SSL_CTX*)> ctx{SSL_CTX_new(TLS_method()), SSL_CTX_free};
  if (!ctx) fail("cannot make an OpenSSL context: " + ssl_errors());
  ERR_clear_error();
  auto readable = [&](const char* key, const std::string& path) {
    if (::access(path.c_str(), R_OK) != 0) fail(std::string(key) + " '" + path + "': " + errno_text(errno));
  };
  readable("certificate", tls.certificate);
  readable("key", tls.key);
  readable("ca", tls.ca);
  if (SSL_CTX_use_certificate_chain_file(ctx.get(), tls.certificate.c_str()) != 1)
    fail("certificate '" + tls.certificate + "' is not a PEM certificate chain: " + ssl_errors());
  if (SSL_CTX_use_PrivateKey_file(ctx.get(), tls.key.c_str(), SSL_FILETYPE_PEM) != 1)
    fail("key '" + tls.key + "' is not an unencrypted PEM private key: " + ssl_errors());
  if (SSL_CTX_check_private_key(ctx.get()) != 1)
    fail("key '" + tls.key + "' does not belong to certificate '" + tls.certificate + "': " + ssl_errors());
  if (SSL_CTX_load_verify_locations(ctx.get(), tls.ca.c_str(), nullptr) != 1)
    fail("ca '" + tls.ca + "' is not a PEM certificate: " + ssl_errors());
  // This end's own certificate must be one the others accept: signed by the same CA.
  std::unique_ptr<SSL, void (*)(SSL*)> ssl{SSL_new(ctx.get()), SSL_free};
  X509* mine = ssl ? SSL_get_certificate(ssl.get()) : nullptr;
  std::unique_ptr<X509_STORE_CTX, void (*)(X509_STORE_CTX*)> verify{X509_STORE_CTX_new(), X509_STORE_CTX_free};
  if (!mine || !verify || X509_STORE_CTX_init(verify.get(), SSL_CTX_get_cert_store(ctx.get()), mine, nullptr) != 1)
    fail("cannot check certificate '" + tls.certificate + "': " + ssl_errors());
  if (X509_verify_cert(verify.get()) != 1)
    fail("certificate '" + tls.certificate + "' is not signed by ca '" + tls.ca +
         "': " + X509_verify_cert_error_string(X509_STORE_CTX_get_error(verify.get())));
}

TlsConfig tls_from_environment(TlsConfig base) {
  if (const char* v = std::getenv("CELER_TLS_CERTIFICATE")) base.certificate = v;
  if (const char* v = std::getenv("CELER_TLS_KEY")) base.key = v;
  if (const char* v = std::getenv("CELER_TLS_CA")) base.ca = v;
  return base;
}

void configure_tls(caf::actor_system_config& cfg, const TlsConfig& tls) {
  if (!tls.enabled()) return;
  check_tls_files(tls);
  cfg.openssl_certificate = tls.certificate;
  cfg.openssl_key = tls.key;
  cfg.openssl_cafile = tls.ca;
  cfg.load<caf::openssl::manager>();
}

Transport::Transport(caf::actor_system& sys, TransportLimits limits) : sys_(sys), guard_(std::make_shared<Guard>()) {
  if (limits.token.size() > kMaxTransportToken)
    throw Error(ErrorCode::invalid_argument, "the transport token is " + std::to_string(limits.token.size()) +
                                                 " bytes; at most " + std::to_string(kMaxTransportToken) + " are allowed");
  if (limits.node_name.size() > kMaxTransportName)
    throw Error(ErrorCode::invalid_argument, "the node name '" + limits.node_name + "' is " + std::to_string(limits.node_name.size()) +
                                                 " bytes; at most " + std::to_string(kMaxTransportName) + " are allowed");
  if (limits.tls.enabled()) {
    // The TLS sessions read their files from the actor system's config (configure_tls).
    const caf::actor_system_config& cfg = sys.config();
    if (!sys.has_openssl_manager() || cfg.openssl_certificate != limits.tls.certificate ||
        cfg.openssl_key != limits.tls.key || cfg.openssl_cafile != limits.tls.ca)
      throw Error(ErrorCode::invalid_argument, "tls: the actor system was not made with configure_tls for these files");
  }
  guard_->limits = std::move(limits);
}

Transport::~Transport() { guard_->chaos.stop(); }

void Transport::inject(const std::string& peer, const LinkFault& fault) { guard_->chaos.inject(peer, fault); }

const TransportLimits& Transport::limits() const { return guard_->limits; }

TransportStats Transport::stats() const {
  TransportStats s;
  s.accepted = guard_->accepted;
  s.bad_preamble = guard_->bad_preamble;
  s.bad_token = guard_->bad_token;
  s.malformed = guard_->malformed;
  s.oversized = guard_->oversized;
  s.over_budget = guard_->over_budget;
  s.tls_refused = guard_->tls_refused;
  s.tls = guard_->limits.tls.enabled();
  s.max_message_bytes = guard_->limits.max_message_bytes;
  s.max_buffered_bytes = guard_->limits.max_buffered_bytes;
  s.buffered_bytes = guard_->buffered;
  s.chaos_dropped = guard_->chaos.dropped;
  s.chaos_delayed = guard_->chaos.delayed;
  s.chaos_duplicated = guard_->chaos.duplicated;
  s.chaos_corrupted = guard_->chaos.corrupted;
  s.refused_messages = decode_failures();
  return s;
}

uint16_t Transport::publish_actor(caf::strong_actor_ptr whom, std::set<std::string> interface, const std::string& host,
                                  uint16_t port) {
  const std::string where = host + ":" + std::to_string(port);
  AddrInfo ai;
  if (std::string why = resolve(host, port, true, ai); !why.empty())
    throw Error(ErrorCode::io, "cannot listen on " + where + ": " + why);
  int fd = -1;
  std::string why = "no address";
  for (addrinfo* a = ai.list; a && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why = errno_text(errno);
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, SOMAXCONN) != 0) {
      why = errno_text(errno);
      ::close(fd);
      fd = -1;
    }
  }
  if (fd < 0) throw Error(ErrorCode::io, "cannot listen on " + where + ": " + why);
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  const uint16_t actual = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6&>(bound).sin6_port
                                                             : reinterpret_cast<sockaddr_in&>(bound).sin_port);
  io::doorman_ptr doorman = caf::make_counted<GuardedDoorman>(multiplexer(sys_), fd, guard_);
  caf::anon_send(basp_broker(sys_), caf::publish_atom::value, std::move(doorman), actual,
                 std::move(whom), std::move(interface));
  return actual;
}

caf::strong_actor_ptr Transport::connect_actor(const std::string& host, uint16_t port, std::chrono::milliseconds timeout,
                                               const std::set<std::string>& interface, const std::string& peer) {
  const std::string where = host + ":" + std::to_string(port);
  // One deadline for the TCP connect, the TLS handshake and the celer handshake together.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const auto left = [&] {
    return std::max(std::chrono::milliseconds(1),
                    std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()));
  };
  std::string why;
  const int fd = connect_tcp(host, port, timeout, why);
  if (fd < 0) throw Error(ErrorCode::unavailable, "cannot connect to celer at " + where + ": " + why);
  io::scribe_ptr scribe;
  if (!guard_->limits.tls.enabled()) {
    scribe = caf::make_counted<GuardedScribe<TcpPolicy>>(multiplexer(sys_), fd, guard_, false, peer);
  } else {
    auto session = start_tls(sys_, fd, false);
    why = session ? finish_tls_handshake(*session, fd, deadline)
                  : "no TLS session could be made";
    if (!why.empty()) {
      ::close(fd);
      throw Error(ErrorCode::unavailable, "cannot connect to celer at " + where + ": " + why);
    }
    scribe = caf::make_counted<GuardedScribe<TlsPolicy>>(multiplexer(sys_), fd, guard_, false, peer, std::move(session),
                                                         guard_, false);
  }
  caf::scoped_actor self{sys_};
  caf::strong_actor_ptr server;
  self->request(basp_broker(sys_), left(), caf::connect_atom::value, std::move(scribe), port)
      .receive(
          [&](const caf::node_id&, caf::strong_actor_ptr& ptr, const std::set<std::string>& offered) {
            if (!ptr) why = "no actor is published there";
            else if (!sys_.assignable(offered, interface))
              why = "the actor published there lacks messages this end sends (another version of celer, or "
                    "another kind of actor than the one expected)";
            else server = std::move(ptr);
          },
          [&](const caf::error& e) {
            // The server closes a connection whose token or version it does not accept before
            // its handshake.
            if (e == caf::sec::request_timeout) why = "no celer handshake within " + std::to_string(timeout.count()) + " ms";
            else if (e == caf::sec::disconnect_during_handshake)
              why = guard_->limits.tls.enabled()
                        ? "the server closed the connection before its handshake: it did not accept this end's "
                          "certificate, or the token is wrong, or it does not speak TLS"
                        : "the server closed the connection before its handshake: the token is wrong (listen.token, "
                          "CELER_TOKEN) or it is not a celer port of this version";
            else why = sys_.render(e);
          });
  if (!server) throw Error(ErrorCode::unavailable, "cannot connect to celer at " + where + ": " + why);
  return server;
}

}  // namespace celer
