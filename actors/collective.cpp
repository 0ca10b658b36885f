#include "actors/collective.hpp"

#include <algorithm>
#include <cstring>

#include "runtime/error.hpp"
#include "schema/codec.hpp"

namespace celer {

namespace {

// A peer runs at most one call ahead (it cannot finish call k + 1 before this rank's share of
// k + 1 arrives); a call further ahead than this means a peer that is not following the protocol.
constexpr uint64_t kMaxPendingCalls = 4;

}  // namespace

// What the endpoint actor and the summing thread share.
struct NetworkAllReduce::Inbox {
  std::mutex mutex;
  std::condition_variable arrived;
  int size = 1;
  struct Call {
    uint64_t number = 0;                      // 0: the slot is free
    std::vector<std::vector<uint8_t>> parts;  // [size], sized once by the constructor
    int count = 0;
  };
  // Calls done + 1 .. done + kMaxPendingCalls, in slot number % kMaxPendingCalls: a ring whose
  // slots (and their vectors of parts) are reused, so a call allocates no bookkeeping.
  Call calls[kMaxPendingCalls];
  uint64_t done = 0;               // the last call sum() has taken
  std::string aborted;             // why, once the group is broken
  std::vector<caf::actor_addr> peers;  // the group's endpoints, once connect() has them
  uint64_t refused = 0;                // partial sums from actors that are not a peer

  void abort(const std::string& why) {
    {
      std::lock_guard lock(mutex);
      if (aborted.empty()) aborted = why;
    }
    arrived.notify_all();
  }
};

namespace {

struct EndpointState {
  static inline const char* name = "celer.collective";
};

EndpointActor::behavior_type endpoint_actor(EndpointActor::stateful_pointer<EndpointState> self, std::shared_ptr<NetworkAllReduce::Inbox> inbox,
                             int rank) {
  self->set_down_handler([=](const caf::down_msg& dm) {
    inbox->abort("tensor-parallel peer " + to_string(dm.source) + " went down: " + self->system().render(dm.reason));
  });
  self->attach_functor([inbox] { inbox->abort("the all-reduce endpoint stopped"); });
  return {
      [=](reduce_atom, ReducePart& part) {
        {
          // From the group's endpoints only: anyone else's numbers would become this rank's sum.
          const caf::actor_addr from = caf::actor_cast<caf::actor_addr>(self->current_sender());
          std::lock_guard lock(inbox->mutex);
          if (std::find(inbox->peers.begin(), inbox->peers.end(), from) == inbox->peers.end()) {
            ++inbox->refused;
            return;
          }
        }
        if (part.rank < 0 || part.rank >= inbox->size || part.rank == rank || part.call == 0) {
          inbox->abort("a partial sum from an invalid rank " + std::to_string(part.rank));
          return;
        }
        if (part.check != wire_checksum(part.bytes.data(), part.bytes.size())) {
          // Summed, it would change this rank's numbers without a trace: the step fails instead.
          inbox->abort("rank " + std::to_string(part.rank) + "'s partial sum of call " + std::to_string(part.call) +
                       " arrived corrupted (its checksum does not match)");
          return;
        }
        {
          std::lock_guard lock(inbox->mutex);
          if (!inbox->aborted.empty()) return;
          NetworkAllReduce::Inbox::Call& call = inbox->calls[part.call % kMaxPendingCalls];
          const auto sent = [&](const char* what) {
            inbox->aborted = "rank " + std::to_string(part.rank) + " sent call " + std::to_string(part.call) + what;
          };
          if (part.call <= inbox->done) {
            sent(" after it was summed");
          } else if (part.call > inbox->done + kMaxPendingCalls || (call.number != 0 && call.number != part.call)) {
            sent(" too far ahead");
          } else if (call.number == part.call && !call.parts[part.rank].empty()) {
            sent(" twice");
          } else {
            call.number = part.call;
            call.parts[part.rank] = std::move(part.bytes);
            ++call.count;
          }
        }
        inbox->arrived.notify_all();
      },
      [=](peers_atom) {
        // The peers connect() stored (a message cannot name them: anyone may send one).
        std::vector<caf::actor_addr> peers;
        {
          std::lock_guard lock(inbox->mutex);
          peers = inbox->peers;
        }
        for (const caf::actor_addr& p : peers)
          if (p && p != self->address()) self->monitor(p);
      },
  };
}

}  // namespace

NetworkAllReduce::NetworkAllReduce(caf::actor_system& sys, int rank, int size, std::chrono::milliseconds timeout)
    : rank_(rank), size_(size), timeout_(timeout), inbox_(std::make_shared<Inbox>()) {
  if (size < 1 || size > 64 || rank < 0 || rank >= size)
    throw Error(ErrorCode::invalid_argument,
                "all-reduce rank " + std::to_string(rank) + " of " + std::to_string(size) + " is out of range");
  inbox_->size = size;
  for (Inbox::Call& c : inbox_->calls) c.parts.resize(static_cast<size_t>(size));
  arrived_.resize(static_cast<size_t>(size));
  endpoint_ = sys.spawn(endpoint_actor, inbox_, rank);
}

NetworkAllReduce::~NetworkAllReduce() { caf::anon_send_exit(endpoint_, caf::exit_reason::user_shutdown); }

void NetworkAllReduce::connect(std::vector<EndpointActor> endpoints) {
  if (static_cast<int>(endpoints.size()) != size_ || endpoints[rank_] != endpoint_)
    throw Error(ErrorCode::invalid_argument, "all-reduce: " + std::to_string(endpoints.size()) + " endpoints for a group of " +
                                                 std::to_string(size_) + ", or rank " + std::to_string(rank_) +
                                                 "'s is not its own");
  for (const EndpointActor& e : endpoints)
    if (!e) throw Error(ErrorCode::invalid_argument, "all-reduce: a rank without an endpoint");
  peers_ = std::move(endpoints);
  {
    std::lock_guard lock(inbox_->mutex);
    inbox_->peers.clear();
    for (const EndpointActor& e : peers_) inbox_->peers.push_back(e.address());
  }
  caf::anon_send(endpoint_, peers_atom::value);
}

bool NetworkAllReduce::connected() const { return !peers_.empty(); }

void NetworkAllReduce::abort(const std::string& why) { inbox_->abort(why); }

void NetworkAllReduce::sum(float* data, int64_t n) {
  if (size_ == 1) return;
  const auto start = std::chrono::steady_clock::now();
  if (peers_.empty()) throw Error(ErrorCode::unavailable, "all-reduce: the group is not connected yet");
  const uint64_t call = ++calls_;
  const size_t n_bytes = static_cast<size_t>(n) * sizeof(float);
  own_.assign(data, data + n);
  // Sent from this rank's endpoint (what peers accept); the last peer gets the part itself, so
  // that with two ranks the bytes are written once and moved, not copied.
  {
    ReducePart part{call, rank_, std::vector<uint8_t>(n_bytes), 0};
    std::memcpy(part.bytes.data(), data, n_bytes);
    part.check = wire_checksum(part.bytes.data(), n_bytes);
    const int last = rank_ == size_ - 1 ? size_ - 2 : size_ - 1;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      if (r == last) caf::send_as(endpoint_, peers_[r], reduce_atom::value, std::move(part));
      else caf::send_as(endpoint_, peers_[r], reduce_atom::value, part);
    }
  }

  {
    std::unique_lock lock(inbox_->mutex);
    Inbox::Call& slot = inbox_->calls[call % kMaxPendingCalls];
    const bool complete = inbox_->arrived.wait_for(lock, timeout_, [&] {
      return !inbox_->aborted.empty() || (slot.number == call && slot.count == size_ - 1);
    });
    if (!complete && inbox_->aborted.empty())
      inbox_->aborted = "all-reduce: no partial sums from every peer within " + std::to_string(timeout_.count()) + " ms";
    if (!inbox_->aborted.empty())
      throw Error(ErrorCode::unavailable, "rank " + std::to_string(rank_) + ": " + inbox_->aborted);
    // The slot's parts become arrived_ and arrived_'s emptied vectors the slot's: both kept.
    arrived_.swap(slot.parts);
    for (auto& p : slot.parts) p.clear();
    slot.number = 0;
    slot.count = 0;
    inbox_->done = call;
  }
  // Every rank adds the same partials in the same (rank) order: the same bits everywhere.
  const float* parts[64];
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) {
      parts[r] = own_.data();
      continue;
    }
    if (arrived_[r].size() != n_bytes) {
      const std::string why = "rank " + std::to_string(r) + " sent " + std::to_string(arrived_[r].size() / 4) +
                              " values, expected " + std::to_string(n);
      abort(why);
      throw Error(ErrorCode::unavailable, "all-reduce: " + why);
    }
    parts[r] = reinterpret_cast<const float*>(arrived_[r].data());
  }
  for (int64_t i = 0; i < n; ++i) data[i] = parts[0][i];
  for (int r = 1; r < size_; ++r)
    for (int64_t i = 0; i < n; ++i) data[i] += parts[r][i];
  count_call(start);
}

}  // namespace celer
