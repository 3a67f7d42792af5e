// Package plan sizes the requests of lazy layer reads from a model of the
// link to the registry, its round trip and its bandwidth, as fs/remote
// measures them, instead of from constants tuned for one link.
//
// The rule behind every size here: a speculative byte costs 1/bandwidth
// of link time now, and a neighbouring file that is read later saves at
// most one round trip. So speculation per demand fetch is bounded by the
// bandwidth-delay product (it never costs more than the round trip it may
// save), and a bulk transfer uses requests long enough that their round
// trips are a small part of their time.
//
// Contract: the functions are pure and cheap (called on every miss); a
// Link that is not Known gives the middle-of-the-road sizes a first read
// needs before anything was measured.
package plan

import "time"

// Link is a model of the path to a registry host.
type Link struct {
	RTT       time.Duration
	Bandwidth float64 // bytes per second; 0 when unknown
}

// Known reports whether both figures are set.
func (l Link) Known() bool { return l.RTT > 0 && l.Bandwidth > 0 }

// BDP is the bandwidth-delay product: the bytes the link moves in one
// round trip.
func (l Link) BDP() int64 { return int64(l.Bandwidth * l.RTT.Seconds()) }

// Transfer is how long n bytes take to flow at the link's bandwidth.
func (l Link) Transfer(n int64) time.Duration {
	if l.Bandwidth <= 0 {
		return 0
	}
	return time.Duration(float64(n) / l.Bandwidth * float64(time.Second))
}

// Readahead bounds. Below MinReadahead a request costs the same whatever
// its size (server and FUSE overhead dominate); above MaxReadahead a
// window would hold files read much later, if at all.
const (
	MinReadahead     = 16 << 10
	MaxReadahead     = 2 << 20
	UnknownReadahead = 256 << 10
)

// Readahead is how many bytes past a missed file (or before it, for
// backward reads) one demand fetch also asks for. useful is the fraction
// of the speculative bytes readers went on to read (Useful): a neighbour
// saves its round trip only when it is read, so the window is the
// bandwidth-delay product scaled by that chance.
func Readahead(l Link, useful float64) int64 {
	if !l.Known() {
		return UnknownReadahead
	}
	useful = max(MinUseful, min(useful, 1))
	return clamp(int64(float64(l.BDP())*useful), MinReadahead, MaxReadahead)
}

// Useful estimates the chance that a speculative byte is read from the
// bytes fetched speculatively so far and those of them read: a prior of
// one half, worth PriorBytes, until a layer's own reads outweigh it.
func Useful(speculated, read int64) float64 {
	u := (float64(read) + PriorUseful*PriorBytes) / (float64(speculated) + PriorBytes)
	return max(MinUseful, min(u, 1))
}

// Usefulness prior and floor: below the floor a window still saves the
// round trips of neighbours read together (a package's modules).
const (
	PriorUseful = 0.5
	PriorBytes  = 1 << 20
	MinUseful   = 0.25
)

// Stream request bounds: a layer read through is streamed in requests of
// at least MinStream bytes, longer on links whose round trip would
// otherwise take more than a tenth of each request's time.
const (
	MinStream = 4 << 20
	MaxStream = 32 << 20
)

// StreamRequest is the size of one request of a streamed layer.
func StreamRequest(l Link) int64 {
	if !l.Known() {
		return MinStream
	}
	return clamp(10*l.BDP(), MinStream, MaxStream)
}

// Worth reports whether the rest of a speculative transfer, remaining
// bytes, is worth keeping when a demand read needs the link: finishing it
// costs remaining/bandwidth, cancelling it costs at most a round trip to
// ask again later.
func Worth(l Link, remaining int64) bool {
	if !l.Known() {
		return remaining <= UnknownReadahead
	}
	return l.Transfer(remaining) <= l.RTT
}

// Density decides when a layer is read through: misses counts the
// demand fetches of a layer, missed their compressed bytes, files and size
// the layer's. A program reading most of a layer file by file (a copy, a
// scan, a checksum of everything) pays a round trip per file; streaming
// the rest of the blob in one pass costs one link-time of the layer.
func Density(misses int, missed int64, files int, size int64) bool {
	if misses < DenseMinMisses || files == 0 || size == 0 {
		return false
	}
	return float64(misses) >= DenseFileFraction*float64(files) || float64(missed) >= DenseByteFraction*float64(size)
}

// Density thresholds: python importing 125 modules reads a few hundred of
// its layers' thousands of files, well under these; a read-through crosses
// them within its first seconds.
const (
	DenseMinMisses    = 256
	DenseFileFraction = 0.25
	DenseByteFraction = 0.40
)

func clamp(v, lo, hi int64) int64 {
	return max(lo, min(v, hi))
}
