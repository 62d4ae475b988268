// Receiver: what every call of one MigrationServer shares (the migration in
// progress, the outcomes, the ended sessions Resolve answers from) and the
// session record that the Control call (ReceiverSession) and the Pages
// calls (PagesReactor) both work on. The protocol is described in
// proto/migration.proto; the checks of its messages in receiver_checks.h.
//
// Locking: one mutex, mu_, guards everything below marked so, the Session
// records included, and cv_ is signalled whenever any of it changes. It is
// held only for bookkeeping: never across a target call (OnSetup, OnFinal,
// OnCommit, OnAbort) nor while a batch is decoded or applied. Guest memory
// is written only while the session is kReceiving, and only between
// `applying` being raised and lowered under mu_; a session leaves
// kReceiving (for Final or a failure) under mu_ and then waits for
// `applying` to drop to zero before the target is finalised or discarded.
// So no batch is ever written into a VM that is being torn down.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "batch_codec.h"
#include "direct_wire.h"
#include "migration.pb.h"
#include "pmlmig/transport/grpc_server.h"
#include "receiver_checks.h"

namespace pmlmig::transport {

class DirectStreams;
class PopulateAhead;
class UffdFill;
class ReceiverSession;

// One data stream's carrier as the session sees it (a gRPC Pages call, or a
// direct TCP connection): the session ends it with Abandon, from another
// thread, under Receiver::mu_, while it is attached.
class DataCall {
 public:
  virtual void Abandon(const Status& why) = 0;

 protected:
  ~DataCall() = default;
};

// The protocol state of a session (proto/migration.proto's state machine;
// WAIT_HELLO is a Control call without a session).
// kPostcopy: committed, the VM runs, owed pages still arrive on the
// Postcopy calls (proto/migration.proto).
enum class SessionState { kWaitSetup, kReceiving, kFinalizing, kPrepared, kCommitting, kPostcopy, kFailing, kEnded };

// One data stream of a session. Guarded by Receiver::mu_.
struct StreamState {
  bool attached = false;
  DataCall* call = nullptr;  // the carrier attached to it, while it is open
  uint64_t next_sequence = 0;
  uint32_t last_round = 0;
  uint64_t pages = 0;
};

// One migration, from Hello to its end.
struct Session {
  using Clock = std::chrono::steady_clock;
  uint64_t id = 0;                               // set before it is shared
  grpc::ServerContextBase* control_ctx = nullptr;  // set before it is shared
  // Everything below is guarded by Receiver::mu_.
  SessionState state = SessionState::kWaitSetup;
  Status failure;  // why another thread failed the session (Pages, Resolve, watchdog)
  // The first Pages call refused, while this session was current, at a
  // first message that did not decode (so it never named a session, and
  // could be anyone's): not a failure by itself, but the cause to report
  // if the source then leaves.
  Status refused_call;
  Clock::time_point opened = Clock::now();
  Clock::time_point last_activity = Clock::now();  // last batch applied or control message
  Clock::time_point prepared_at{};
  std::unique_ptr<engine::MigrationTarget> target;
  uint32_t streams = 0;
  Checksum checksum = Checksum::kXxh64;  // of every batch, from Setup
  std::vector<StreamState> per_stream;
  // The direct data streams (direct_receiver.h), when offered at Setup;
  // closed by EndSession outside the lock (it joins their threads).
  std::shared_ptr<DirectStreams> direct;  // shared_ptr: its deleter is bound where it is made
  // Round 0's populate-ahead workers (populate_ahead.h), when the server
  // has them on; stopped at the first later round, PostcopyPrepare, Final
  // or the end, always before the target goes.
  std::shared_ptr<PopulateAhead> populate;
  // Round 0's UffdFill (uffd_fill.h), for several streams when the server
  // has it on; stopped like populate.
  std::shared_ptr<UffdFill> fill;
  std::shared_ptr<const UffdFill> fill_counts;  // the same, kept to the end for its counts
  int applying = 0;  // Pages threads writing into target memory right now
  uint64_t in_place_bytes = 0;  // page data read straight into target memory (StreamIntake::BeginInPlace)
  engine::TransferStats totals;
  uint32_t rounds = 0;
  // Post-copy: armed at Final (owned by the target), serving from Commit.
  engine::PostcopyMemory* postcopy = nullptr;
  std::deque<uint64_t> requests;              // pages vCPUs wait for, not yet written to the source
  bool requests_attached = false;             // a "requests" Postcopy call is open
  bool push_attached = false;                 // a "push" Postcopy call is open
  std::vector<grpc::ServerContextBase*> postcopy_calls;  // the open Postcopy calls, ended with the session
  // Post-copy recovery (proto PostcopyResume). The link is the Control call
  // and the two Postcopy calls that serve the session now; each resume
  // starts a new one, and the calls of an older link are stale (they place
  // what they still carry, which is harmless: a page is placed once, from
  // the paused source's memory, but they change nothing else).
  uint32_t postcopy_link = 0;              // the current link (0: the one from Commit)
  bool postcopy_paused = false;            // the current link broke; waiting for a resume
  Clock::time_point paused_at{};
  Status pause_reason;                     // why the link broke
  uint32_t postcopy_recoveries = 0;
  bool postcopy_used = false;              // armed at Final
  bool switch_prepared = false;            // a PostcopyPrepare came: no page batch is taken any more
  engine::FinalReply prepared;             // set at Commit: what the outcome reports, from whichever link
};

// Ends a call now with `why` as the status its peer reads. TryCancel would
// send only CANCELLED "Cancelled on the server side", and once a call is
// cancelled the handler's own status is never sent. Thread-safe, as
// TryCancel is.
void CancelCall(grpc::ServerContextBase* ctx, const Status& why);
// "250 ms".
inline std::string Ms(std::chrono::milliseconds d) { return std::to_string(d.count()) + " ms"; }

class Receiver {
 public:
  using Clock = std::chrono::steady_clock;
  Receiver(MigrationServer::TargetFactory factory, MigrationServerOptions options);

  const MigrationServerOptions& options() const { return options_; }
  // Whether the listening port takes direct data streams (a PortAcceptor
  // serves it). Set once, before the server starts.
  void set_direct_port(bool on) { direct_port_ = on; }
  // The PortAcceptor's thread: a connection whose hello names `hello.
  // session_id`. Never blocks.
  void AdoptDirect(UniqueFd fd, const direct::Hello& hello);
  // A call's credentials (the shared secret, when one is configured).
  Status Authorize(const grpc::ServerContextBase& ctx) const;
  // Resolve: how session `id` ended, deciding a PREPARED one as discarded
  // (under mu_, so it and a late Commit never both win).
  grpc::Status Resolve(uint64_t id, proto::ResolveReply* reply);

  Result<ReceivedMigration> WaitForMigration(Clock::time_point deadline);
  void RefuseNewMigrations(std::string why);
  // Fails the migration in progress and makes every wait return; false if
  // it was already shutting down.
  bool BeginShutdown();
  // After the server stopped: wakes whoever still waits.
  void NotifyAll();

 private:
  friend class ReceiverSession;
  friend class PagesReactor;
  friend class StreamIntake;
  friend class DirectStreams;
  friend class PostcopyCall;

  // Under mu_, another thread than Control's (a Pages call, Resolve, the
  // watchdog) fails the session: ends its Pages calls but `self` with `why`
  // and cancels the control call with `why` (what the source reads), whose
  // thread then ends the session. Only while it waits for Setup, receives,
  // or is prepared (never once Final is being restored or Commit is
  // running); returns whether it did.
  bool MarkFailedLocked(Session& session, const Status& why, const DataCall* self);
  // The deadline of the phase `session` is in, if it has passed: why.
  Status CheckDeadline(const Session& session, Clock::time_point now) const;
  // Under mu_: what to report when the session fails by `consequence` (its
  // source left or a call broke): the refused call before it, if any.
  static Status FirstCause(const Session& session, const Status& consequence);
  // Control thread: ends the session (once): stops and waits for the Pages
  // threads, discards the target unless completed, records the outcome, and
  // frees the receiver for the next migration.
  void EndSession(const std::shared_ptr<Session>& session, engine::Outcome status, const Status& error,
                  engine::FinalReply reply = {});
  // Under mu_, a post-copy session's link broke (`why`): unless recovery is
  // off (then it fails as MarkFailedLocked), ends the link's calls, marks
  // the session paused and lets the VM run on, waiting for a resume. Only
  // for the current link (`link`), and only once; returns whether it did.
  bool PausePostcopyLocked(Session& session, uint32_t link, const Status& why);
  // Under mu_: ends every open Pages call of the session but `self` with
  // `why` (the sender learns the receiver's reason, not just "cancelled").
  void EndStreams(Session& session, const Status& why, const DataCall* self);

  const MigrationServer::TargetFactory factory_;
  const MigrationServerOptions options_;
  const ReceiverLimits limits_;
  bool direct_port_ = false;

  std::mutex mu_;
  std::condition_variable cv_;
  std::mt19937_64 rng_{std::random_device{}()};  // guarded by mu_
  std::shared_ptr<Session> current_;             // guarded by mu_: the one migration in progress
  std::deque<ReceivedMigration> outcomes_;       // guarded by mu_
  struct Ended {
    bool committed = false;
    Status error;  // why it failed, when it was not committed
  };
  std::map<uint64_t, Ended> ended_;              // guarded by mu_: for Resolve, and for late batches
  std::string refuse_new_;                       // guarded by mu_: why new migrations are refused, if they are
  bool shutting_down_ = false;                   // guarded by mu_
};

}  // namespace pmlmig::transport
