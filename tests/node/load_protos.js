// Loads every .proto of the public API with @grpc/proto-loader and prints its services and methods
// as JSON, proving the contract compiles outside Python.
const path = require("path");
const protoLoader = require("@grpc/proto-loader");
const grpc = require("@grpc/grpc-js");

const protoRoot = path.resolve(__dirname, "..", "..", "protos");
const files = process.argv.slice(2);
const definition = protoLoader.loadSync(files, {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const pkg = grpc.loadPackageDefinition(definition);
const services = {};
for (const [name, value] of Object.entries(pkg.cbir.v1)) {
  if (typeof value === "function" && value.service) {
    services[name] = Object.keys(value.service);
  }
}
const messages = Object.keys(definition).filter((k) => definition[k].type && !definition[k].format?.startsWith?.("Protocol Buffer"));
console.log(JSON.stringify({ services, typeCount: messages.length }));
