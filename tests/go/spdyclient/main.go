// spdyclient: a test client built on github.com/docker/spdystream, the SPDY/3.1 library that
// client-go's remotecommand and portforward use (Debian: golang-github-docker-spdystream-dev).
// Built by tests/go_client.py in GOPATH mode. Modes:
//
//	capture                      frames written by spdystream's Framer, one hex line each
//	exec URL PROTO STDIN TTY     remote command like client-go: streams error, stdin (if
//	                             STDIN=1), stdout, stderr (unless TTY=1), resize (TTY=1, v3+);
//	                             copies its stdin to the stdin stream, prints stdout and
//	                             stderr, then "PROTOCOL: <negotiated>" and "ERROR: <error stream>"
//	                             on stderr
//	portforward URL PORT         one forwarded connection (requestid 0): its stdin to the
//	                             data stream, the data stream to stdout; "ERROR: ..." on stderr
package main

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/docker/spdystream"
	"github.com/docker/spdystream/spdy"
)

func capture() {
	var buf bytes.Buffer
	fr, err := spdy.NewFramer(&buf, &buf)
	if err != nil {
		panic(err)
	}
	emit := func(f spdy.Frame) {
		buf.Reset()
		if err := fr.WriteFrame(f); err != nil {
			panic(err)
		}
		fmt.Println(hex.EncodeToString(buf.Bytes()))
	}
	h1 := http.Header{}
	h1.Set("streamtype", "error")
	emit(&spdy.SynStreamFrame{StreamId: 1, Headers: h1})
	h2 := http.Header{}
	h2.Set("streamtype", "data")
	h2.Set("port", "8080")
	h2.Set("requestid", "0")
	emit(&spdy.SynStreamFrame{StreamId: 3, Priority: 0, Headers: h2})
	h3 := http.Header{}
	h3["multi"] = []string{"a", "b"}
	emit(&spdy.SynStreamFrame{StreamId: 5, AssociatedToStreamId: 1, Priority: 7, Slot: 0, Headers: h3,
		CFHeader: spdy.ControlFrameHeader{Flags: spdy.ControlFlagFin}})
	emit(&spdy.SynReplyFrame{StreamId: 1, Headers: http.Header{}})
	emit(&spdy.HeadersFrame{StreamId: 3, Headers: h1})
	emit(&spdy.DataFrame{StreamId: 1, Data: []byte("hello")})
	emit(&spdy.DataFrame{StreamId: 3, Flags: spdy.DataFlagFin})
	emit(&spdy.RstStreamFrame{StreamId: 5, Status: spdy.Cancel})
	emit(&spdy.SettingsFrame{FlagIdValues: []spdy.SettingsFlagIdValue{{Flag: 0, Id: spdy.SettingsInitialWindowSize, Value: 65536}}})
	emit(&spdy.PingFrame{Id: 1})
	emit(&spdy.GoAwayFrame{LastGoodStreamId: 5, Status: spdy.GoAwayOK})
	emit(&spdy.WindowUpdateFrame{StreamId: 3, DeltaWindowSize: 1000})
}

// upgrade dials the URL and upgrades like client-go's SpdyRoundTripper (POST).
func upgrade(rawurl string, protos []string) (net.Conn, string) {
	u, err := url.Parse(rawurl)
	if err != nil {
		fail("url: %v", err)
	}
	conn, err := net.DialTimeout("tcp", u.Host, 10*time.Second)
	if err != nil {
		fail("dial: %v", err)
	}
	req := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n", u.RequestURI(), u.Host)
	for _, p := range protos {
		req += "X-Stream-Protocol-Version: " + p + "\r\n"
	}
	req += "Content-Length: 0\r\n\r\n"
	if _, err := conn.Write([]byte(req)); err != nil {
		fail("write: %v", err)
	}
	br := bufio.NewReaderSize(conn, 1)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		fail("response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(resp.Body)
		fail("status %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}
	if br.Buffered() != 0 {
		fail("server sent a frame before the client's first")
	}
	return conn, resp.Header.Get("X-Stream-Protocol-Version")
}

func fail(f string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "FAIL: "+f+"\n", a...)
	os.Exit(2)
}

func stream(c *spdystream.Connection, kv ...string) *spdystream.Stream {
	h := http.Header{}
	for i := 0; i < len(kv); i += 2 {
		h.Set(kv[i], kv[i+1])
	}
	s, err := c.CreateStream(h, nil, false)
	if err != nil {
		fail("create stream %v: %v", kv, err)
	}
	if err := s.WaitTimeout(30 * time.Second); err != nil {
		fail("stream %v not replied: %v", kv, err)
	}
	return s
}

func execMode(rawurl, proto string, stdin, tty bool) {
	var protos []string
	if proto != "" {
		protos = strings.Split(proto, ",")
	}
	conn, chosen := upgrade(rawurl, protos)
	c, err := spdystream.NewConnection(conn, false)
	if err != nil {
		fail("spdy: %v", err)
	}
	go c.Serve(spdystream.NoOpStreamHandler)
	errS := stream(c, "streamtype", "error")
	var wg sync.WaitGroup
	if stdin {
		in := stream(c, "streamtype", "stdin")
		go func() { io.Copy(in, os.Stdin); in.Close() }()
	}
	out := stream(c, "streamtype", "stdout")
	wg.Add(1)
	go func() { defer wg.Done(); io.Copy(os.Stdout, out) }()
	if !tty {
		serr := stream(c, "streamtype", "stderr")
		wg.Add(1)
		go func() { defer wg.Done(); io.Copy(os.Stderr, serr) }()
	} else if chosen == "v3.channel.k8s.io" || chosen == "v4.channel.k8s.io" {
		rs := stream(c, "streamtype", "resize")
		rs.Write([]byte("{\"Width\":100,\"Height\":40}\n"))
	}
	msg, _ := io.ReadAll(errS)
	wg.Wait()
	fmt.Fprintf(os.Stderr, "PROTOCOL: %s\nERROR: %s\n", chosen, msg)
	c.Close()
}

func portForwardMode(rawurl, port string) {
	conn, chosen := upgrade(rawurl, []string{"portforward.k8s.io"})
	if chosen != "portforward.k8s.io" {
		fail("negotiated %q", chosen)
	}
	c, err := spdystream.NewConnection(conn, false)
	if err != nil {
		fail("spdy: %v", err)
	}
	go c.Serve(spdystream.NoOpStreamHandler)
	errS := stream(c, "streamtype", "error", "port", port, "requestid", "0")
	errS.Close()
	data := stream(c, "streamtype", "data", "port", port, "requestid", "0")
	go func() { io.Copy(data, os.Stdin); data.Close() }()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); io.Copy(os.Stdout, data) }()
	msg, _ := io.ReadAll(errS)
	if len(msg) == 0 {
		wg.Wait()
	}
	fmt.Fprintf(os.Stderr, "ERROR: %s\n", msg)
	c.Close()
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: spdyclient capture | exec URL PROTOS STDIN TTY | portforward URL PORT")
	}
	switch os.Args[1] {
	case "capture":
		capture()
	case "exec":
		execMode(os.Args[2], os.Args[3], os.Args[4] == "1", os.Args[5] == "1")
	case "portforward":
		portForwardMode(os.Args[2], os.Args[3])
	default:
		fail("unknown mode %s", os.Args[1])
	}
}
