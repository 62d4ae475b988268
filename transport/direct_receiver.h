// DirectStreams: the receiver's direct data streams of one session
// (direct_wire.h), which asked for them at Setup. The server's PortAcceptor
// (port_acceptor.h) hands over each connection whose first bytes are a
// direct hello; Receiver::AdoptDirect finds the session it names, and Adopt
// checks the session's key (which only the authorized Control call has
// seen) and serves the connection on a thread of its own: batches, each
// read whole into a reused buffer and handed to the connection's
// StreamIntake (the same checks, writes and acks as a gRPC Pages call), then
// the end.
//
// What a connection that is not the session's gets: one naming another
// session, or with the wrong version or key, is answered with an error and
// closed, and the session is untouched (anyone may connect to the port).
// Once a hello has named the session with its key, everything a Pages call
// may be refused for fails the migration, with the same message.
//
// Thread-safety: Adopt from the acceptor's thread; Close from the session's
// Control thread, outside Receiver::mu_ (it joins threads that take it). A
// connection's Abandon runs on other threads under Receiver::mu_.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "direct_wire.h"
#include "receiver.h"

namespace pmlmig::transport {

class DirectStreams {
 public:
  // The `streams` direct streams of session `session_id`, which must
  // present `key`.
  DirectStreams(Receiver& receiver, uint64_t session_id, uint32_t streams, const direct::Key& key);
  // Close().
  ~DirectStreams();
  DirectStreams(const DirectStreams&) = delete;
  DirectStreams& operator=(const DirectStreams&) = delete;

  const direct::Key& key() const { return key_; }
  // A connection whose hello named this session: served if the key and
  // version are right, else answered with the error and closed. Never blocks.
  void Adopt(UniqueFd fd, const direct::Hello& hello);
  // Refuses further connections, ends every one and joins their threads.
  void Close();

 private:
  class Connection;

  Receiver& r_;
  const uint64_t session_id_;
  const uint32_t streams_;
  const direct::Key key_;
  std::mutex mu_;
  bool closed_ = false;                                   // guarded by mu_
  std::vector<std::unique_ptr<Connection>> connections_;  // guarded by mu_
};

// Answers a connection that is refused before it is served (best effort,
// never blocks), then closes it.
void RefuseDirect(UniqueFd fd, const Status& why);

}  // namespace pmlmig::transport
